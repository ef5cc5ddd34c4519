// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {X402Channels} from "../src/X402Channels.sol";
import {X402Fixture} from "./X402Fixture.sol";

/// @notice Fuzzed amounts: a claim lands exactly when it is within the voucher and the deposit, and the
/// payer's exits (refund, withdrawal) never take what the receiver claimed.
contract X402ChannelsFuzzTest is X402Fixture {
    function setUp() public {
        vm.warp(1_700_000_000);
        _deployChannels();
    }

    function testFuzz_a_claim_lands_iff_within_voucher_and_deposit(uint128 deposited, uint128 ceiling, uint128 target)
        public
    {
        deposited = uint128(bound(deposited, 1, type(uint128).max / 2));
        _deposit(_cfg(), deposited);
        X402Channels.VoucherClaim[] memory rows = _rows(_claimRow(_cfg(), ceiling, target, X_PAYER_KEY));
        vm.prank(receiver);
        (bool ok,) = address(channels).call(abi.encodeCall(X402Channels.claim, (rows)));
        assertTrue(ok == (target <= ceiling && target <= deposited), "claim lands iff within voucher and deposit");
        (uint128 balance, uint128 claimed) = _channel(_cfg());
        assertEq(balance, deposited, "balance untouched by claims");
        assertEq(claimed, ok ? target : 0, "claimed");
    }

    function testFuzz_exits_never_take_what_was_claimed(
        uint128 deposited,
        uint128 claimed,
        uint128 withdrawn,
        uint128 refunded,
        bool claimInDelay
    ) public {
        deposited = uint128(bound(deposited, 2, 1e30));
        claimed = uint128(bound(claimed, 0, deposited));
        withdrawn = uint128(bound(withdrawn, 1, deposited));
        refunded = uint128(bound(refunded, 1, type(uint128).max));
        _deposit(_cfg(), deposited);
        X402Channels.VoucherClaim[] memory rows = _rows(_claimRow(_cfg(), claimed, claimed, X_PAYER_KEY));
        if (!claimInDelay) {
            vm.prank(receiver);
            channels.claim(rows);
            withdrawn = uint128(bound(withdrawn, 1, deposited - claimed == 0 ? 1 : deposited - claimed));
        }
        vm.prank(xpayer);
        (bool started,) = address(channels).call(abi.encodeCall(X402Channels.initiateWithdraw, (_cfg(), withdrawn)));
        assertTrue(started || deposited == claimed, "a withdrawal of the unclaimed part starts");
        if (claimInDelay) {
            vm.prank(receiver);
            channels.claim(rows);
        }
        vm.prank(receiver);
        channels.refund(_cfg(), refunded);
        vm.warp(block.timestamp + DELAY);
        if (started) {
            vm.prank(xpayer);
            (bool finalized,) = address(channels).call(abi.encodeCall(X402Channels.finalizeWithdraw, (_cfg())));
            finalized;
        }
        channels.settle(receiver, address(usd));
        assertEq(usd.balanceOf(receiver), claimed, "the receiver is paid all it claimed");
        assertLe(usd.balanceOf(xpayer), deposited - claimed, "the payer never gets back claimed funds");
        (uint128 balance, uint128 onChain) = _channel(_cfg());
        assertEq(usd.balanceOf(address(channels)) + claimed, balance, "tokens held = unclaimed balance");
        assertEq(onChain, claimed, "claimed");
    }

    function testFuzz_a_withdrawal_finishes_only_after_its_delay(uint128 deposited, uint128 amount, uint256 dt)
        public
    {
        deposited = uint128(bound(deposited, 1, 1e30));
        amount = uint128(bound(amount, 1, deposited));
        dt = bound(dt, 0, 3 * uint256(DELAY));
        _deposit(_cfg(), deposited);
        vm.prank(xpayer);
        channels.initiateWithdraw(_cfg(), amount);
        vm.warp(block.timestamp + dt);
        vm.prank(xpayer);
        (bool ok,) = address(channels).call(abi.encodeCall(X402Channels.finalizeWithdraw, (_cfg())));
        assertTrue(ok == (dt >= DELAY), "finalizes iff the delay has passed");
        assertEq(usd.balanceOf(xpayer), ok ? amount : 0, "pays the pending amount, only then");
    }

    function testFuzz_a_refund_pays_the_unclaimed_part_up_to_the_amount(
        uint128 deposited,
        uint128 claimed,
        uint128 amount
    ) public {
        deposited = uint128(bound(deposited, 1, 1e30));
        claimed = uint128(bound(claimed, 0, deposited));
        amount = uint128(bound(amount, 1, type(uint128).max));
        _deposit(_cfg(), deposited);
        X402Channels.VoucherClaim[] memory rows = _rows(_claimRow(_cfg(), claimed, claimed, X_PAYER_KEY));
        vm.prank(receiver);
        channels.claim(rows);
        bytes32 id = channels.getChannelId(_cfg());
        bytes memory sig = _sig(AUTHORIZER_KEY, channels.getRefundDigest(id, 0, amount));
        vm.prank(address(0xBEEF)); // anyone relays the authorizer's signature
        channels.refundWithSignature(_cfg(), amount, 0, sig);
        uint128 available = deposited - claimed;
        assertEq(usd.balanceOf(xpayer), amount < available ? amount : available, "min(amount, unclaimed)");
        (uint128 balance, uint128 onChain) = _channel(_cfg());
        assertEq(onChain, claimed, "the claim stands");
        assertLe(claimed, balance, "never below what was claimed");
        assertEq(channels.refundNonce(id), 1, "the nonce moved on");
    }
}
