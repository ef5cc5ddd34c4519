// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {PaymentEscrow} from "../src/PaymentEscrow.sol";
import {Settlement} from "../src/Settlement.sol";
import {FeeToken} from "./FeeToken.sol";
import {Fixture} from "./Fixture.sol";

/// @notice A token that starts taking a fee on transfers (USDT's switch): the escrow and the pot never
/// promise more than they hold. Without this, a deposit credited the amount sent while the escrow got
/// less, and a settle marked the amount collected and grew the pot by it while the pot got less: the last
/// payer to withdraw, or the last payee to claim, found the contract short.
contract FeeTokenTest is Fixture {
    FeeToken internal feeToken;

    function setUp() public override {
        super.setUp();
        vm.etch(address(token), type(FeeToken).runtimeCode);
        feeToken = FeeToken(address(token));
    }

    function test_a_deposit_credits_what_the_escrow_received() public {
        feeToken.setFee(100); // 1 %
        _fund(payer, node, 10_000);
        (uint256 balance,,) = escrow.accounts(payer, node);
        assertEq(balance, 9_900, "credited");
        assertEq(token.balanceOf(address(escrow)), balance, "the escrow holds every credit");
    }

    function test_a_settle_whose_collection_arrives_short_reverts() public {
        _fund(payer, node, 10_000);
        feeToken.setFee(100);
        Settlement.SignedVoucher memory sv = _sign(PAYER_KEY, _voucher(payer, 0, 1_000));
        vm.prank(node);
        vm.expectRevert(abi.encodeWithSelector(Settlement.CollectedShort.selector, 0, 1_000, 990));
        settlement.settle(1, _one(sv), _amounts(1_000), keccak256("root"), 1_000, keccak256("receipts"), 1);
        assertEq(settlement.collected(payer, node, 0), 0, "nothing marked collected");
        assertEq(settlement.rewardsTotal(node), 0, "nothing promised");
    }

    function test_without_a_fee_nothing_changes() public {
        _fund(payer, node, 10_000);
        _settleOne(1, 1_000, 1_000, keccak256("root"), 1_000);
        assertEq(token.balanceOf(address(settlement)), 1_000, "the pot holds what it promises");
        (uint256 balance,,) = escrow.accounts(payer, node);
        assertEq(balance, 9_000, "left in escrow");
        assertEq(token.balanceOf(address(escrow)), balance, "the escrow holds every credit");
    }
}
