// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Settlement} from "../src/Settlement.sol";
import {Fixture} from "./Fixture.sol";

/// @notice Attacks on the rewards pot: a root that over-promises, a vetoed epoch's funds, and what the
/// guardian's corrected root (`amend`) may and may not do.
contract SettlementAttackTest is Fixture {
    address internal alice = address(0xA11);
    address internal bob = address(0xB0);

    function setUp() public override {
        super.setUp();
        _fund(payer, node, 10_000);
    }

    /// @dev Epoch `epochId` collects `amount` more (lane 0, cumulative `total`), tree {alice: a, bob: b}.
    function _settle(uint64 epochId, uint256 amount, uint256 total, uint256 a, uint256 b)
        internal
        returns (bytes32 la, bytes32 lb)
    {
        (la, lb) = (_leaf(alice, a), _leaf(bob, b));
        _settleOne(epochId, total, amount, _pairRoot(la, lb), total);
    }

    function _veto(uint64 epochId) internal {
        vm.prank(guardian);
        settlement.veto(node, epochId);
    }

    /// Epoch 1 collects 100 but its root promises alice 150; epoch 2 collects 900 and is vetoed.
    /// Alice's claim against epoch 1 must not be paid out of epoch 2's (vetoed) money.
    function test_attack_over_promising_epoch_cannot_spend_a_later_vetoed_epoch() public {
        (, bytes32 lb) = _settle(1, 100, 100, 150, 0);
        _settle(2, 900, 1000, 700, 300);
        _veto(2);
        vm.warp(block.timestamp + CHALLENGE);
        vm.expectRevert(abi.encodeWithSelector(Settlement.ExceedsEpochTotal.selector, node, 1, 0, 150, 100));
        settlement.claim(node, 1, alice, 150, _proof1(lb));
        assertEq(token.balanceOf(alice), 0, "alice got nothing of epoch 2");
        assertEq(token.balanceOf(address(settlement)), 1000, "the vetoed epoch's funds stay in the pot");
    }

    /// The same over-promise, but epoch 2 is honest and unlocked: epoch 1's cap still holds, and the
    /// over-promised leaf is paid only through epoch 2's (honest) tree.
    function test_attack_over_promising_epoch_is_capped_by_its_own_total_not_the_latest() public {
        (, bytes32 lb1) = _settle(1, 100, 100, 150, 0);
        (, bytes32 lb2) = _settle(2, 900, 1000, 700, 300);
        vm.warp(block.timestamp + CHALLENGE);
        vm.expectRevert(abi.encodeWithSelector(Settlement.ExceedsEpochTotal.selector, node, 1, 0, 150, 100));
        settlement.claim(node, 1, alice, 150, _proof1(lb1));
        assertEq(settlement.claim(node, 2, alice, 700, _proof1(lb2)), 700, "paid through the honest tree");
    }

    /// @dev Epoch 1 (100, honest, unlocked), epoch 2 (+900, a fraudulent root giving alice everything)
    /// and epoch 3 (+500) settled; the guardian vetoes 2, which voids 3 too. 1500 sit in the pot.
    function _vetoedRun() internal returns (bytes32 la1, bytes32 lb1) {
        (la1, lb1) = _settle(1, 100, 100, 70, 30);
        vm.warp(block.timestamp + CHALLENGE);
        _settle(2, 900, 1000, 1000, 0);
        _settle(3, 500, 1500, 1050, 450);
        _veto(2);
    }

    /// @dev The guardian posts the corrected tree {alice: a, bob: b} over `total`.
    function _amend(uint256 a, uint256 b, uint256 total) internal returns (bytes32 la, bytes32 lb) {
        (la, lb) = (_leaf(alice, a), _leaf(bob, b));
        vm.prank(guardian);
        settlement.amend(node, _pairRoot(la, lb), total, keccak256("corrected receipts"), 3);
    }

    /// Funds collected in a vetoed epoch (and the later, voided one) are never stuck: the guardian's
    /// corrected root pays every collected wei to its leaves once its own challenge period is over.
    function test_attack_vetoed_epoch_funds_are_paid_out_through_the_corrected_root() public {
        _vetoedRun();
        (bytes32 la, bytes32 lb) = (_leaf(alice, 1050), _leaf(bob, 450));
        uint64 unlockAt = uint64(block.timestamp + CHALLENGE);
        vm.expectEmit();
        emit Settlement.EpochAmended(node, 2, _pairRoot(la, lb), 1500, keccak256("corrected receipts"), 3, unlockAt, 3);
        _amend(1050, 450, 1500);
        assertEq(settlement.lastEpoch(node), 2, "epoch 3 forgotten");
        assertEq(settlement.firstVetoedEpoch(node), 0, "veto cleared");
        vm.expectRevert(abi.encodeWithSelector(Settlement.EpochLocked.selector, node, 2, unlockAt));
        settlement.claim(node, 2, alice, 1050, _proof1(lb));
        vm.warp(unlockAt);
        vm.expectRevert(abi.encodeWithSelector(Settlement.UnknownEpoch.selector, node, 3));
        settlement.claim(node, 3, alice, 1050, _proof1(lb));
        vm.expectRevert(abi.encodeWithSelector(Settlement.InvalidProof.selector, node, 2, alice, 1000));
        settlement.claim(node, 2, alice, 1000, _proof1(_leaf(bob, 0))); // the vetoed root is gone
        settlement.claim(node, 2, alice, 1050, _proof1(lb));
        settlement.claim(node, 2, bob, 450, _proof1(la));
        assertEq(token.balanceOf(alice) + token.balanceOf(bob), 1500, "every collected wei paid out");
        assertEq(token.balanceOf(address(settlement)), 0, "nothing stuck");
    }

    /// The guardian's corrected total must be exactly the pot: never more (it would pay out money
    /// not collected), never less (the rest would be stuck).
    function test_attack_guardian_cannot_amend_to_another_total() public {
        _vetoedRun();
        vm.expectRevert(abi.encodeWithSelector(Settlement.RewardsTotalMismatch.selector, 1500, 1501));
        _amend(1051, 450, 1501);
        vm.expectRevert(abi.encodeWithSelector(Settlement.RewardsTotalMismatch.selector, 1500, 1499));
        _amend(1049, 450, 1499);
    }

    /// A corrected tree whose leaves sum above the pot still pays at most the pot: another node's
    /// funds in the same contract stay out of reach.
    function test_attack_guardian_tree_above_the_pot_cannot_drain_another_node() public {
        _vetoedRun();
        address other = vm.addr(0xC0FFEE);
        _fund(payer, other, 5000);
        Settlement.Voucher memory v = _voucher(payer, 0, 5000);
        v.node = other;
        Settlement.SignedVoucher memory sv = _sign(PAYER_KEY, v);
        vm.prank(other);
        settlement.settle(1, _one(sv), _amounts(5000), bytes32("r"), 5000, 0, 0);
        (bytes32 la, bytes32 lb) = _amend(6000, 1000, 1500);
        vm.warp(block.timestamp + CHALLENGE);
        vm.expectRevert(abi.encodeWithSelector(Settlement.ExceedsEpochTotal.selector, node, 2, 0, 6000, 1500));
        settlement.claim(node, 2, alice, 6000, _proof1(lb));
        settlement.claim(node, 2, bob, 1000, _proof1(la));
        assertEq(token.balanceOf(address(settlement)), 5000 + 500, "the other pot is intact");
    }

    /// Claims are cumulative per account and `claimed` survives the amend: what an account was paid
    /// through an earlier epoch is never paid again by the corrected root.
    function test_attack_amend_cannot_reopen_a_paid_claim() public {
        (, bytes32 lb1) = _vetoedRun();
        settlement.claim(node, 1, alice, 70, _proof1(lb1));
        (bytes32 la, bytes32 lb) = _amend(70, 1430, 1500);
        vm.warp(block.timestamp + CHALLENGE);
        vm.expectRevert(abi.encodeWithSelector(Settlement.NothingToClaim.selector, node, alice, 70, 70));
        settlement.claim(node, 2, alice, 70, _proof1(lb));
        assertEq(settlement.claim(node, 2, bob, 1430, _proof1(la)), 1430, "bob paid his share");
        assertEq(token.balanceOf(alice), 70, "alice paid once");
        assertEq(settlement.paidOut(node), 1500, "paid out = collected");
    }

    /// The node cannot settle on top of a vetoed epoch; after the amend it settles from the corrected
    /// epoch on, on top of the corrected total.
    function test_attack_node_cannot_settle_on_top_of_a_vetoed_epoch() public {
        _vetoedRun();
        Settlement.SignedVoucher memory sv = _sign(PAYER_KEY, _voucher(payer, 0, 1600));
        vm.expectRevert(abi.encodeWithSelector(Settlement.NodeVetoed.selector, node, 2));
        vm.prank(node);
        settlement.settle(4, _one(sv), _amounts(100), bytes32("r4"), 1600, 0, 0);
        _amend(1050, 450, 1500);
        vm.startPrank(node);
        vm.expectRevert(abi.encodeWithSelector(Settlement.EpochOutOfOrder.selector, node, 3, 4));
        settlement.settle(4, _one(sv), _amounts(100), bytes32("r4"), 1600, 0, 0);
        settlement.settle(3, _one(sv), _amounts(100), bytes32("r3"), 1600, 0, 0);
        vm.stopPrank();
        (bytes32 root,,,,, bool vetoed) = settlement.epochs(node, 3);
        assertEq(root, bytes32("r3"), "epoch 3 is the new one");
        assertTrue(!vetoed, "and not vetoed");
    }

    function test_amend_only_by_the_guardian_and_only_after_a_veto() public {
        _settle(1, 100, 100, 70, 30);
        vm.expectRevert(abi.encodeWithSelector(Settlement.NodeNotVetoed.selector, node));
        _amend(70, 30, 100);
        _veto(1);
        vm.expectRevert(abi.encodeWithSelector(Settlement.NotGuardian.selector, node));
        vm.prank(node);
        settlement.amend(node, bytes32("r"), 100, 0, 0);
        _amend(60, 40, 100);
        vm.expectRevert(abi.encodeWithSelector(Settlement.NodeNotVetoed.selector, node));
        _amend(50, 50, 100);
    }

    /// The corrected epoch is locked again, so a wrong correction can itself be vetoed and amended.
    function test_amended_epoch_can_be_vetoed_and_amended_again() public {
        _vetoedRun();
        (, bytes32 lb) = _amend(1500, 0, 1500);
        _veto(2);
        vm.warp(block.timestamp + CHALLENGE);
        assertTrue(!settlement.isClaimable(node, 2), "vetoed again");
        vm.expectRevert(abi.encodeWithSelector(Settlement.EpochIsVetoed.selector, node, 2));
        settlement.claim(node, 2, alice, 1500, _proof1(lb));
        (bytes32 la2,) = _amend(1050, 450, 1500);
        vm.warp(block.timestamp + CHALLENGE);
        assertTrue(settlement.isClaimable(node, 2), "the second correction is claimable");
        settlement.claim(node, 2, bob, 450, _proof1(la2));
    }
}
