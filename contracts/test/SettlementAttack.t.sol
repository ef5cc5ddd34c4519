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
}
