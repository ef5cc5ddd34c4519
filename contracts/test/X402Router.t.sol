// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {PaymentEscrow} from "../src/PaymentEscrow.sol";
import {Settlement} from "../src/Settlement.sol";
import {X402Channels} from "../src/X402Channels.sol";
import {X402Router} from "../src/X402Router.sol";
import {X402Fixture} from "./X402Fixture.sol";

/// @notice The hand-off: what x402 channels pay the node's router enters the node's Settlement pot as
/// the router's lane, in the same epoch, tree and split as lane collections (docs/x402.md).
contract X402RouterTest is X402Fixture {
    uint256 internal constant NODE_KEY = 0xB0B;
    uint256 internal constant OTHER_NODE_KEY = 0xB0C;
    bytes32 internal constant LANE_VOUCHER_TYPEHASH = keccak256(
        "Voucher(address payer,address node,uint32 lane,uint256 cumulative,bytes32 requestHash,uint64 deadline)"
    );

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

    function _laneVoucher(address nodeAddr, uint256 cumulative) internal view returns (Settlement.Voucher memory) {
        return Settlement.Voucher(address(router), nodeAddr, 0, cumulative, bytes32(0), uint64(block.timestamp + 1 days));
    }

    function _signLane(uint256 key, Settlement.Voucher memory v) internal view returns (Settlement.SignedVoucher[] memory out) {
        out = new Settlement.SignedVoucher[](1);
        out[0] = Settlement.SignedVoucher(v, _sig(key, settlement.voucherDigest(v)));
    }

    function _amounts(uint256 a) internal pure returns (uint256[] memory out) {
        out = new uint256[](1);
        out[0] = a;
    }

    function _collect(uint128 ceiling, uint128 total) internal returns (uint256 swept) {
        X402Channels.VoucherClaim[] memory rows = _rows(_claimRow(_cfg(), ceiling, total, X_PAYER_KEY));
        vm.prank(node);
        return router.collect(rows);
    }

    function test_swept_channel_funds_are_collected_into_the_node_pot_by_settle() public {
        _deposit(_cfg(), 1000);
        assertEq(_collect(400, 300), 300, "swept");
        (uint256 escrowed,,) = escrow.accounts(address(router), node);
        assertEq(escrowed, 300, "in the node's escrow account, payer = router");
        assertEq(_collect(700, 650), 350, "a later claim sweeps the difference");
        bytes32 leaf = keccak256(bytes.concat(keccak256(abi.encode(address(0xD5), uint256(650)))));
        Settlement.SignedVoucher[] memory lane = _signLane(NODE_KEY, _laneVoucher(node, 650));
        vm.prank(node);
        settlement.settle(1, lane, _amounts(650), leaf, 650, bytes32(0), 2);
        assertEq(settlement.rewardsTotal(node), 650, "pot");
        assertEq(usd.balanceOf(address(settlement)), 650, "tokens in the pot");
        vm.warp(block.timestamp + 1 hours);
        settlement.claim(node, 1, address(0xD5), 650, new bytes32[](0));
        assertEq(usd.balanceOf(address(0xD5)), 650, "the payee is paid what the x402 payer paid");
    }

    function test_only_the_node_collects_but_anyone_can_sweep_towards_the_pot() public {
        _deposit(_cfg(), 1000);
        X402Channels.VoucherClaim[] memory rows = _rows(_claimRow(_cfg(), 400, 300, X_PAYER_KEY));
        vm.prank(address(0xBAD));
        vm.expectRevert(abi.encodeWithSelector(X402Router.NotNode.selector, address(0xBAD)));
        router.collect(rows);
        vm.prank(node);
        channels.claim(rows);
        vm.prank(address(0xBAD));
        assertEq(router.sweep(), 300, "a stranger's sweep");
        (uint256 escrowed,,) = escrow.accounts(address(router), node);
        assertEq(escrowed, 300, "still lands in the node's escrow account");
        assertEq(usd.balanceOf(address(0xBAD)), 0, "the stranger got nothing");
    }

    function test_a_router_voucher_signed_by_anyone_but_its_node_is_refused() public {
        _deposit(_cfg(), 1000);
        _collect(400, 300);
        Settlement.SignedVoucher[] memory forged = _signLane(0xBEEF, _laneVoucher(node, 300));
        vm.prank(node);
        vm.expectRevert(abi.encodeWithSelector(Settlement.InvalidVoucherSignature.selector, 0, address(router)));
        settlement.settle(1, forged, _amounts(300), bytes32(0), 300, bytes32(0), 1);
    }

    function test_another_node_cannot_collect_this_router() public {
        _deposit(_cfg(), 1000);
        _collect(400, 300);
        address other = vm.addr(OTHER_NODE_KEY);
        Settlement.SignedVoucher[] memory theirs = _signLane(OTHER_NODE_KEY, _laneVoucher(other, 300));
        vm.prank(other);
        vm.expectRevert(abi.encodeWithSelector(Settlement.InvalidVoucherSignature.selector, 0, address(router)));
        settlement.settle(1, theirs, _amounts(300), bytes32(0), 300, bytes32(0), 1);
    }

    function test_router_signatures_are_its_node_signatures() public view {
        bytes32 h = keccak256("anything");
        assertTrue(router.isValidSignature(h, _sig(NODE_KEY, h)) == bytes4(0x1626ba7e), "node's signature");
        assertTrue(router.isValidSignature(h, _sig(0xBEEF, h)) == bytes4(0xffffffff), "a stranger's");
        assertTrue(router.isValidSignature(h, hex"00") == bytes4(0xffffffff), "garbage");
    }
}
