// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {DemoToken3009} from "../src/DemoToken3009.sol";
import {X402Channels} from "../src/X402Channels.sol";
import {X402Fixture} from "./X402Fixture.sol";

/// @notice Random deposits, claims (honest and over the line), settles, refunds and withdrawals over
/// four channels (two payers, two receivers), with ghost totals of every token that moved.
contract X402Handler is X402Fixture {
    uint256[2] internal payerKeys = [uint256(0xC1), 0xC2];
    address[2] public receiversList = [address(0xE1), address(0xE2)];

    uint256 public deposited;
    uint256 public returnedToPayers;
    uint256 public paidToReceivers;
    uint256 public cheatsLanded; // claims above a voucher or a balance that went through: must stay 0
    uint256 public earlyExits; // withdrawals finalized before their delay: must stay 0
    uint256 public wrongExits; // withdrawals that paid other than min(pending, unclaimed): must stay 0
    uint256 public wrongRefunds; // refunds that paid other than min(amount, unclaimed): must stay 0
    uint256 public replayedRefunds; // a refund signature used twice: must stay 0
    mapping(bytes32 channelId => uint128) public maxSigned;

    constructor() {
        _deployChannels();
        authorizer = vm.addr(AUTHORIZER_KEY);
    }

    function cfgOf(uint256 i) public view returns (X402Channels.ChannelConfig memory) {
        address p = vm.addr(payerKeys[i % 2]);
        return X402Channels.ChannelConfig(p, p, receiversList[(i / 2) % 2], authorizer, address(usd), DELAY, bytes32(0));
    }

    function idOf(uint256 i) public view returns (bytes32) {
        return channels.getChannelId(cfgOf(i));
    }

    function token() external view returns (DemoToken3009) {
        return usd;
    }

    function channelsContract() external view returns (X402Channels) {
        return channels;
    }

    function deposit(uint256 i, uint128 amount, uint256 salt) external {
        amount = uint128(bound(amount, 1, 1e30));
        X402Channels.ChannelConfig memory cfg = cfgOf(i % 4);
        usd.mint(cfg.payer, amount);
        bytes32 nonce = keccak256(abi.encode(channels.getChannelId(cfg), salt));
        if (usd.authorizationState(cfg.payer, nonce)) return;
        bytes32 structHash = keccak256(
            abi.encode(usd.RECEIVE_WITH_AUTHORIZATION_TYPEHASH(), cfg.payer, address(collector), amount, 0, block.timestamp + 1, nonce)
        );
        bytes memory sig = _sig(payerKeys[(i % 4) % 2], keccak256(abi.encodePacked("\x19\x01", usd.DOMAIN_SEPARATOR(), structHash)));
        channels.deposit(cfg, amount, address(collector), abi.encode(uint256(0), block.timestamp + 1, salt, sig));
        deposited += amount;
    }

    function claim(uint256 i, uint128 ceiling, uint128 target, bool cheat) external {
        X402Channels.ChannelConfig memory cfg = cfgOf(i % 4);
        bytes32 id = channels.getChannelId(cfg);
        (uint128 balance, uint128 claimed) = channels.channels(id);
        if (!cheat) {
            ceiling = uint128(bound(ceiling, claimed, type(uint128).max));
            target = uint128(bound(target, claimed, ceiling < balance ? ceiling : balance));
        }
        bytes memory sig = _sig(payerKeys[(i % 4) % 2], channels.getVoucherDigest(id, ceiling));
        X402Channels.VoucherClaim[] memory rows = _rows(X402Channels.VoucherClaim(X402Channels.Voucher(cfg, ceiling), sig, target));
        vm.prank(cfg.receiver);
        (bool ok,) = address(channels).call(abi.encodeCall(X402Channels.claim, (rows)));
        if (ok && (target > ceiling || target > balance || target < claimed)) ++cheatsLanded;
        if (ok && ceiling > maxSigned[id]) maxSigned[id] = ceiling;
    }

    function settle(uint256 r) external {
        address to = receiversList[r % 2];
        uint256 before = usd.balanceOf(to);
        channels.settle(to, address(usd));
        paidToReceivers += usd.balanceOf(to) - before;
    }

    function refund(uint256 i, uint128 amount) external {
        X402Channels.ChannelConfig memory cfg = cfgOf(i % 4);
        amount = uint128(bound(amount, 1, type(uint128).max));
        uint256 expected = _refundable(cfg, amount);
        uint256 before = usd.balanceOf(cfg.payer);
        vm.prank(cfg.receiver);
        channels.refund(cfg, amount);
        _countRefund(cfg, before, expected);
    }

    /// The relayable refund: anyone submits the receiver authorizer's signature, once.
    function refundWithSignature(uint256 i, uint128 amount, address relayer) external {
        X402Channels.ChannelConfig memory cfg = cfgOf(i % 4);
        amount = uint128(bound(amount, 1, type(uint128).max));
        bytes32 id = channels.getChannelId(cfg);
        uint256 nonce = channels.refundNonce(id);
        bytes memory sig = _sig(AUTHORIZER_KEY, channels.getRefundDigest(id, nonce, amount));
        uint256 expected = _refundable(cfg, amount);
        uint256 before = usd.balanceOf(cfg.payer);
        vm.prank(relayer);
        channels.refundWithSignature(cfg, amount, nonce, sig);
        _countRefund(cfg, before, expected);
        vm.prank(relayer);
        (bool replayed,) =
            address(channels).call(abi.encodeCall(X402Channels.refundWithSignature, (cfg, amount, nonce, sig)));
        if (replayed) ++replayedRefunds;
    }

    function _refundable(X402Channels.ChannelConfig memory cfg, uint128 amount) internal view returns (uint256) {
        (uint128 balance, uint128 claimed) = channels.channels(channels.getChannelId(cfg));
        uint256 available = balance - claimed;
        return amount < available ? amount : available;
    }

    function _countRefund(X402Channels.ChannelConfig memory cfg, uint256 before, uint256 expected) internal {
        uint256 got = usd.balanceOf(cfg.payer) - before;
        if (got != expected) ++wrongRefunds;
        returnedToPayers += got;
    }

    function initiateWithdraw(uint256 i, uint128 amount) external {
        X402Channels.ChannelConfig memory cfg = cfgOf(i % 4);
        (uint128 balance, uint128 claimed) = channels.channels(channels.getChannelId(cfg));
        if (balance == claimed) return;
        amount = uint128(bound(amount, 1, balance - claimed));
        vm.prank(cfg.payer);
        channels.initiateWithdraw(cfg, amount);
    }

    function finalizeWithdraw(uint256 i) external {
        X402Channels.ChannelConfig memory cfg = cfgOf(i % 4);
        bytes32 id = channels.getChannelId(cfg);
        (uint128 pending, uint40 initiatedAt) = channels.pendingWithdrawals(id);
        (uint128 balance, uint128 claimed) = channels.channels(id);
        uint256 before = usd.balanceOf(cfg.payer);
        vm.prank(cfg.payer);
        (bool ok,) = address(channels).call(abi.encodeCall(X402Channels.finalizeWithdraw, (cfg)));
        uint256 got = usd.balanceOf(cfg.payer) - before;
        if (ok && block.timestamp < uint256(initiatedAt) + DELAY) ++earlyExits;
        if (ok && got != (pending < balance - claimed ? pending : balance - claimed)) ++wrongExits;
        returnedToPayers += got;
    }

    function warp(uint256 dt) external {
        vm.warp(block.timestamp + bound(dt, 0, 2 days));
    }
}

contract X402InvariantTest is X402Fixture {
    X402Handler internal handler;

    function setUp() public {
        vm.warp(1_700_000_000);
        handler = new X402Handler();
    }

    function targetContracts() public view returns (address[] memory out) {
        out = new address[](1);
        out[0] = address(handler);
    }

    /// Every token in = held + returned to payers + paid to receivers; held = balances - settled.
    function invariant_tokens_are_conserved() public view {
        X402Channels c = handler.channelsContract();
        uint256 held = handler.token().balanceOf(address(c));
        assertEq(handler.deposited(), held + handler.returnedToPayers() + handler.paidToReceivers(), "conservation");
        uint256 balances;
        for (uint256 i; i < 4; ++i) {
            (uint128 b,) = c.channels(handler.idOf(i));
            balances += b;
        }
        uint256 settled;
        for (uint256 r; r < 2; ++r) {
            (, uint128 s) = c.receivers(handler.receiversList(r), address(handler.token()));
            settled += s;
        }
        assertEq(held, balances - settled, "held = balances - settled");
    }

    /// Each channel's claimed total is within its balance and the highest voucher its payer signed;
    /// receivers' claimed totals add up to the channels'; nobody is paid beyond what was claimed.
    function invariant_claims_within_vouchers_and_balances() public view {
        X402Channels c = handler.channelsContract();
        uint256 claimedSum;
        for (uint256 i; i < 4; ++i) {
            bytes32 id = handler.idOf(i);
            (uint128 b, uint128 claimed) = c.channels(id);
            assertLe(claimed, b, "claimed <= balance");
            assertLe(claimed, handler.maxSigned(id), "claimed <= signed");
            claimedSum += claimed;
        }
        uint256 receiverClaimed;
        uint256 settled;
        for (uint256 r; r < 2; ++r) {
            (uint128 tc, uint128 s) = c.receivers(handler.receiversList(r), address(handler.token()));
            receiverClaimed += tc;
            settled += s;
        }
        assertEq(receiverClaimed, claimedSum, "receivers' claims = channels' claims");
        assertLe(settled, receiverClaimed, "settled <= claimed");
        assertEq(handler.paidToReceivers(), settled, "paid = settled");
        assertEq(handler.cheatsLanded(), 0, "no claim over the line landed");
        assertLe(claimedSum, handler.deposited() - handler.returnedToPayers(), "claimed <= deposits less exits");
    }

    /// A withdrawal finishes only after its delay and pays min(pending, unclaimed); a refund pays
    /// min(amount, unclaimed); a refund signature works once.
    function invariant_exits_follow_the_rules() public view {
        assertEq(handler.earlyExits(), 0, "no withdrawal before its delay");
        assertEq(handler.wrongExits(), 0, "a withdrawal pays min(pending, unclaimed)");
        assertEq(handler.wrongRefunds(), 0, "a refund pays min(amount, unclaimed)");
        assertEq(handler.replayedRefunds(), 0, "a refund signature works once");
    }
}
