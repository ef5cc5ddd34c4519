// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {PaymentEscrow} from "../src/PaymentEscrow.sol";
import {Settlement} from "../src/Settlement.sol";
import {X402Channels} from "../src/X402Channels.sol";
import {X402Router} from "../src/X402Router.sol";
import {X402Fixture} from "./X402Fixture.sol";

/// @notice Gas of the x402 path, logged as `gas <name>` like GasTest (run with `--isolate`): a deposit,
/// the router's claim-and-sweep of 100 channels (per channel: divide by 100; compare with
/// `Settlement.settle (100 vouchers)` per lane), a relayed claim of 100, and the epoch's one router lane.
contract X402GasTest is X402Fixture {
    uint256 internal constant NODE_KEY = 0xB0B;
    PaymentEscrow internal escrow;
    Settlement internal settlement;
    X402Router internal router;
    address internal node;

    function setUp() public {
        vm.warp(1_700_000_000);
        _deployChannels();
        node = vm.addr(NODE_KEY);
        address predicted = vm.computeCreateAddress(address(this), vm.getNonce(address(this)) + 1);
        escrow = new PaymentEscrow(IERC20(address(usd)), 1 days, predicted);
        settlement = new Settlement(IERC20(address(usd)), escrow, address(0x7EA5), 500, 1000, address(0x6A4D), 1 hours);
        router = new X402Router(node, channels, escrow);
        receiver = address(router);
        authorizer = node;
    }

    function _report(string memory name) internal view returns (uint256 used) {
        used = vm.lastCallGas().gasTotalUsed;
        log(string.concat("gas ", name), used);
    }

    /// @dev `n` funded channels of `n` payers, each with a voucher of 1e15 claimed in full.
    function _rowsOf(uint256 n) internal returns (X402Channels.VoucherClaim[] memory rows) {
        rows = new X402Channels.VoucherClaim[](n);
        for (uint256 i; i < n; ++i) {
            uint256 key = 0x1000 + i;
            X402Channels.ChannelConfig memory cfg = _config(receiver, bytes32(0));
            cfg.payer = vm.addr(key);
            cfg.payerAuthorizer = cfg.payer;
            usd.mint(cfg.payer, 1e18);
            channels.deposit(cfg, 1e18, address(collector), _authorization(key, cfg, 1e18, i));
            rows[i] = _claimRow(cfg, 1e15, 1e15, key);
        }
    }

    function test_gas_deposit_through_the_erc3009_collector() public {
        usd.mint(xpayer, 1e18);
        bytes memory auth = _authorization(X_PAYER_KEY, _cfg(), 1e18, 1);
        channels.deposit(_cfg(), 1e18, address(collector), auth);
        _report("X402Channels.deposit (ERC-3009, new channel)");
    }

    function test_gas_router_collect_100_channels() public {
        X402Channels.VoucherClaim[] memory rows = _rowsOf(100);
        vm.prank(node);
        router.collect(rows);
        _report("X402Router.collect (100 channels: claim + sweep + escrow)");
    }

    function test_gas_claim_with_signature_100_channels() public {
        X402Channels.VoucherClaim[] memory rows = _rowsOf(100);
        bytes memory sig = _sig(NODE_KEY, channels.getClaimBatchDigest(rows));
        channels.claimWithSignature(rows, sig);
        _report("X402Channels.claimWithSignature (100 channels)");
    }

    function test_gas_settle_the_router_lane() public {
        X402Channels.VoucherClaim[] memory rows = _rowsOf(1);
        vm.prank(node);
        router.collect(rows);
        Settlement.Voucher memory v =
            Settlement.Voucher(address(router), node, 0, 1e15, bytes32(0), uint64(block.timestamp + 1 days));
        Settlement.SignedVoucher[] memory lane = new Settlement.SignedVoucher[](1);
        lane[0] = Settlement.SignedVoucher(v, _sig(NODE_KEY, settlement.voucherDigest(v)));
        uint256[] memory amounts = new uint256[](1);
        amounts[0] = 1e15;
        vm.prank(node);
        settlement.settle(1, lane, amounts, bytes32("root"), 1e15, bytes32("receipts"), 100);
        _report("Settlement.settle (1 router lane, ERC-1271)");
    }
}
