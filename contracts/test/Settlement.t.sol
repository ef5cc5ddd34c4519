// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {DemoToken} from "../src/DemoToken.sol";
import {PaymentEscrow} from "../src/PaymentEscrow.sol";
import {Settlement} from "../src/Settlement.sol";
import {Fixture} from "./Fixture.sol";

contract SettlementTest is Fixture {
    address internal alice = address(0xA11);
    address internal bob = address(0xB0);

    function setUp() public override {
        super.setUp();
        _fund(payer, node, 1000);
    }

    /// @dev Epoch 1: 100 collected, tree {alice: 70, bob: 30}.
    function _epochOne() internal returns (bytes32 la, bytes32 lb) {
        (la, lb) = (_leaf(alice, 70), _leaf(bob, 30));
        _settleOne(1, 100, 100, _pairRoot(la, lb), 100);
    }

    function test_settle_collects_records_epoch_and_emits() public {
        bytes32 root = _pairRoot(_leaf(alice, 70), _leaf(bob, 30));
        Settlement.SignedVoucher memory sv = _sign(PAYER_KEY, _voucher(payer, 3, 150));
        vm.expectEmit();
        emit Settlement.VoucherCollected(node, payer, 3, 150, 100);
        vm.expectEmit();
        emit Settlement.EpochSettled(node, 1, root, 100, bytes32("rc"), 7, 100, uint64(block.timestamp + CHALLENGE));
        vm.prank(node);
        settlement.settle(1, _one(sv), _amounts(100), root, 100, bytes32("rc"), 7);
        (bytes32 r, uint256 total, bytes32 rc, uint64 count, uint64 unlockAt, bool vetoed) = settlement.epochs(node, 1);
        assertEq(r, root, "root");
        assertEq(total, 100, "total");
        assertEq(rc, bytes32("rc"), "receipts root");
        assertEq(count, 7, "receipt count");
        assertEq(unlockAt, block.timestamp + CHALLENGE, "unlock");
        assertTrue(!vetoed, "not vetoed");
        assertEq(settlement.lastEpoch(node), 1, "last epoch");
        assertEq(settlement.collected(payer, node, 3), 100, "collected on lane");
        assertEq(settlement.rewardsTotal(node), 100, "rewards total");
        assertEq(token.balanceOf(address(settlement)), 100, "pot");
        assertTrue(!settlement.isClaimable(node, 1), "locked");
    }

    function test_same_voucher_collects_the_rest_in_a_later_epoch() public {
        Settlement.SignedVoucher memory sv = _sign(PAYER_KEY, _voucher(payer, 0, 150));
        vm.startPrank(node);
        settlement.settle(1, _one(sv), _amounts(100), bytes32("r1"), 100, 0, 0);
        settlement.settle(2, _one(sv), _amounts(50), bytes32("r2"), 150, 0, 0);
        vm.expectRevert(abi.encodeWithSelector(Settlement.AmountExceedsVoucher.selector, 0, 1, 0));
        settlement.settle(3, _one(sv), _amounts(1), bytes32("r3"), 151, 0, 0);
        vm.stopPrank();
        assertEq(settlement.collected(payer, node, 0), 150, "collected = cumulative");
    }

    function test_claim_after_unlock_by_anyone_for_anyone() public {
        (bytes32 la, bytes32 lb) = _epochOne();
        vm.expectRevert(abi.encodeWithSelector(Settlement.EpochLocked.selector, node, 1, uint64(block.timestamp + CHALLENGE)));
        settlement.claim(node, 1, alice, 70, _proof1(lb));
        vm.warp(block.timestamp + CHALLENGE);
        assertTrue(settlement.isClaimable(node, 1), "unlocked");
        vm.expectEmit();
        emit Settlement.Claimed(node, alice, 1, 70, 70);
        settlement.claim(node, 1, alice, 70, _proof1(lb));
        assertEq(token.balanceOf(alice), 70, "alice paid");
        vm.expectRevert(abi.encodeWithSelector(Settlement.NothingToClaim.selector, node, alice, 70, 70));
        settlement.claim(node, 1, alice, 70, _proof1(lb));
        vm.prank(bob);
        settlement.claim(node, 1, bob, 30, _proof1(la));
        assertEq(token.balanceOf(address(settlement)), 0, "pot emptied exactly");
        assertEq(settlement.paidOut(node), 100, "paid out");
    }

    function test_cumulative_claims_across_epochs_and_old_epoch_while_new_locked() public {
        (, bytes32 lb) = _epochOne();
        vm.warp(block.timestamp + CHALLENGE);
        // Epoch 2: 100 more, alice's cumulative 70 -> 140; epoch 2 still locked, epoch 1 still claimable.
        (bytes32 la2, bytes32 lb2) = (_leaf(alice, 140), _leaf(bob, 60));
        Settlement.SignedVoucher memory sv = _sign(PAYER_KEY, _voucher(payer, 0, 200));
        vm.prank(node);
        settlement.settle(2, _one(sv), _amounts(100), _pairRoot(la2, lb2), 200, 0, 0);
        settlement.claim(node, 1, alice, 70, _proof1(lb));
        vm.expectRevert(abi.encodeWithSelector(Settlement.NothingToClaim.selector, node, alice, 70, 70));
        settlement.claim(node, 1, alice, 70, _proof1(lb));
        vm.warp(block.timestamp + CHALLENGE);
        assertEq(settlement.claim(node, 2, alice, 140, _proof1(lb2)), 70, "second claim pays the difference");
        assertEq(token.balanceOf(alice), 140, "alice total");
        assertEq(settlement.claimed(node, alice), 140, "claimed");
        // An older, lower leaf is now nothing due.
        vm.expectRevert(abi.encodeWithSelector(Settlement.NothingToClaim.selector, node, alice, 70, 140));
        settlement.claim(node, 1, alice, 70, _proof1(lb));
        settlement.claim(node, 2, bob, 60, _proof1(la2));
    }

    function test_claim_many_skips_nothing_due() public {
        (bytes32 la, bytes32 lb) = _epochOne();
        vm.warp(block.timestamp + CHALLENGE);
        settlement.claim(node, 1, alice, 70, _proof1(lb));
        Settlement.Claim[] memory claims = new Settlement.Claim[](2);
        claims[0] = Settlement.Claim(node, 1, alice, 70, _proof1(lb));
        claims[1] = Settlement.Claim(node, 1, bob, 30, _proof1(la));
        assertEq(settlement.claimMany(claims), 30, "only bob paid");
        assertEq(settlement.claimMany(claims), 0, "nothing left, no revert");
        claims[0].cumulativeAmount = 71;
        vm.expectRevert(abi.encodeWithSelector(Settlement.InvalidProof.selector, node, 1, alice, 71));
        settlement.claimMany(claims);
    }

    function test_veto_voids_epoch_and_later_and_blocks_node() public {
        _epochOne();
        vm.warp(block.timestamp + CHALLENGE);
        bytes32 l2 = _leaf(alice, 200);
        _settleOne(2, 200, 100, l2, 200);
        _settleOne(3, 300, 100, _leaf(alice, 300), 300);
        vm.expectRevert(abi.encodeWithSelector(Settlement.NotGuardian.selector, address(this)));
        settlement.veto(node, 3);
        vm.expectRevert(abi.encodeWithSelector(Settlement.EpochNotLocked.selector, node, 1));
        vm.prank(guardian);
        settlement.veto(node, 1);
        vm.expectEmit();
        emit Settlement.EpochVetoed(node, 3);
        vm.prank(guardian);
        settlement.veto(node, 3);
        vm.prank(guardian);
        settlement.veto(node, 2); // an earlier locked epoch may still be vetoed
        vm.expectRevert(abi.encodeWithSelector(Settlement.EpochIsVetoed.selector, node, 3));
        vm.prank(guardian);
        settlement.veto(node, 3);
        vm.expectRevert(abi.encodeWithSelector(Settlement.UnknownEpoch.selector, node, 4));
        vm.prank(guardian);
        settlement.veto(node, 4);
        vm.warp(block.timestamp + CHALLENGE);
        vm.expectRevert(abi.encodeWithSelector(Settlement.EpochIsVetoed.selector, node, 2));
        settlement.claim(node, 2, alice, 200, new bytes32[](0));
        vm.expectRevert(abi.encodeWithSelector(Settlement.EpochIsVetoed.selector, node, 3));
        settlement.claim(node, 3, alice, 300, new bytes32[](0));
        assertTrue(settlement.isClaimable(node, 1) && !settlement.isClaimable(node, 3), "claimable views");
        Settlement.SignedVoucher memory sv = _sign(PAYER_KEY, _voucher(payer, 0, 400));
        vm.expectRevert(abi.encodeWithSelector(Settlement.NodeVetoed.selector, node, 2));
        vm.prank(node);
        settlement.settle(4, _one(sv), _amounts(100), bytes32("r"), 400, 0, 0);
    }

    function test_revert_epoch_out_of_order() public {
        _epochOne();
        Settlement.SignedVoucher memory sv = _sign(PAYER_KEY, _voucher(payer, 0, 200));
        vm.startPrank(node);
        vm.expectRevert(abi.encodeWithSelector(Settlement.EpochOutOfOrder.selector, node, 2, 1));
        settlement.settle(1, _one(sv), _amounts(100), bytes32("r"), 200, 0, 0);
        vm.expectRevert(abi.encodeWithSelector(Settlement.EpochOutOfOrder.selector, node, 2, 3));
        settlement.settle(3, _one(sv), _amounts(100), bytes32("r"), 200, 0, 0);
        vm.stopPrank();
    }

    function test_revert_bad_settle_inputs() public {
        Settlement.SignedVoucher memory sv = _sign(PAYER_KEY, _voucher(payer, 0, 100));
        vm.startPrank(node);
        vm.expectRevert(abi.encodeWithSelector(Settlement.LengthMismatch.selector, 1, 0));
        settlement.settle(1, _one(sv), new uint256[](0), bytes32("r"), 100, 0, 0);
        vm.expectRevert(abi.encodeWithSelector(Settlement.ZeroCollect.selector, 0));
        settlement.settle(1, _one(sv), _amounts(0), bytes32("r"), 0, 0, 0);
        vm.expectRevert(abi.encodeWithSelector(Settlement.AmountExceedsVoucher.selector, 0, 101, 100));
        settlement.settle(1, _one(sv), _amounts(101), bytes32("r"), 101, 0, 0);
        vm.expectRevert(abi.encodeWithSelector(Settlement.RewardsTotalMismatch.selector, 100, 99));
        settlement.settle(1, _one(sv), _amounts(100), bytes32("r"), 99, 0, 0);
        vm.stopPrank();
        vm.expectRevert(abi.encodeWithSelector(Settlement.VoucherNodeMismatch.selector, 0, node));
        settlement.settle(1, _one(sv), _amounts(100), bytes32("r"), 100, 0, 0);
    }

    function test_revert_expired_or_badly_signed_voucher() public {
        Settlement.Voucher memory v = _voucher(payer, 0, 100);
        Settlement.SignedVoucher memory sv = _sign(NODE_KEY, v);
        vm.startPrank(node);
        vm.expectRevert(abi.encodeWithSelector(Settlement.InvalidVoucherSignature.selector, 0, payer));
        settlement.settle(1, _one(sv), _amounts(100), bytes32("r"), 100, 0, 0);
        sv.signature = hex"1234";
        vm.expectRevert(abi.encodeWithSelector(Settlement.InvalidVoucherSignature.selector, 0, payer));
        settlement.settle(1, _one(sv), _amounts(100), bytes32("r"), 100, 0, 0);
        sv = _sign(PAYER_KEY, v);
        vm.warp(v.deadline + 1);
        vm.expectRevert(abi.encodeWithSelector(Settlement.VoucherExpired.selector, 0, v.deadline));
        settlement.settle(1, _one(sv), _amounts(100), bytes32("r"), 100, 0, 0);
        vm.stopPrank();
    }

    function test_revert_claim_errors() public {
        (bytes32 la, bytes32 lb) = _epochOne();
        vm.expectRevert(abi.encodeWithSelector(Settlement.UnknownEpoch.selector, node, 0));
        settlement.claim(node, 0, alice, 70, _proof1(lb));
        vm.expectRevert(abi.encodeWithSelector(Settlement.UnknownEpoch.selector, node, 2));
        settlement.claim(node, 2, alice, 70, _proof1(lb));
        vm.warp(block.timestamp + CHALLENGE);
        vm.expectRevert(abi.encodeWithSelector(Settlement.InvalidProof.selector, node, 1, alice, 71));
        settlement.claim(node, 1, alice, 71, _proof1(lb));
        vm.expectRevert(abi.encodeWithSelector(Settlement.InvalidProof.selector, node, 1, bob, 30));
        settlement.claim(node, 1, bob, 30, _proof1(lb));
        settlement.claim(node, 1, bob, 30, _proof1(la));
    }

    function test_revert_tree_above_pot_cannot_drain_other_nodes() public {
        // A node publishes a tree whose leaves sum above what it collected.
        bytes32 lb = _leaf(bob, 100);
        _settleOne(1, 100, 100, _pairRoot(_leaf(alice, 100), lb), 100);
        // Another node's pot holds 500 in the same contract.
        address other = vm.addr(0xC0FFEE);
        _fund(payer, other, 500);
        Settlement.Voucher memory v = _voucher(payer, 0, 500);
        v.node = other;
        Settlement.SignedVoucher memory sv = _sign(PAYER_KEY, v);
        vm.prank(other);
        settlement.settle(1, _one(sv), _amounts(500), bytes32("r"), 500, 0, 0);
        assertEq(token.balanceOf(address(settlement)), 600, "two pots");
        vm.warp(block.timestamp + CHALLENGE);
        settlement.claim(node, 1, alice, 100, _proof1(lb));
        vm.expectRevert(abi.encodeWithSelector(Settlement.ExceedsEpochTotal.selector, node, 1, 100, 100, 100));
        settlement.claim(node, 1, bob, 100, _proof1(_leaf(alice, 100)));
    }

    function test_revert_constructor_checks() public {
        vm.expectRevert(Settlement.ZeroAddress.selector);
        new Settlement(token, escrow, address(0), 0, 0, guardian, CHALLENGE);
        vm.expectRevert(Settlement.ZeroAddress.selector);
        new Settlement(token, escrow, treasury, 0, 0, address(0), CHALLENGE);
        vm.expectRevert(abi.encodeWithSelector(Settlement.BadFeeBps.selector, 5000, 5001));
        new Settlement(token, escrow, treasury, 5000, 5001, guardian, CHALLENGE);
        IERC20 other = new DemoToken();
        vm.expectRevert(abi.encodeWithSelector(Settlement.TokenMismatch.selector, address(other), address(token)));
        new Settlement(other, escrow, treasury, 0, 0, guardian, CHALLENGE);
        assertEq(settlement.protocolBps(), PROTOCOL_BPS, "protocol bps");
        assertEq(settlement.nodeBps(), NODE_BPS, "node bps");
        assertEq(settlement.treasury(), treasury, "treasury");
        PaymentEscrow e = settlement.escrow();
        assertEq(address(e), address(escrow), "escrow");
    }
}
