// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {PaymentEscrow} from "../src/PaymentEscrow.sol";
import {Settlement} from "../src/Settlement.sol";
import {Fixture} from "./Fixture.sol";

contract PaymentEscrowTest is Fixture {
    function _account() internal view returns (uint256 balance, uint256 thawing, uint64 endAt) {
        return escrow.accounts(payer, node);
    }

    function test_deposit_credits_the_payer_node_account() public {
        token.mint(payer, 100);
        vm.startPrank(payer);
        token.approve(address(escrow), 100);
        vm.expectEmit();
        emit PaymentEscrow.Deposited(payer, node, 60);
        escrow.deposit(node, 60);
        escrow.deposit(address(0xBEEF), 40);
        vm.stopPrank();
        (uint256 balance,,) = _account();
        assertEq(balance, 60, "balance for node");
        assertEq(token.balanceOf(address(escrow)), 100, "escrow holds the tokens");
        assertEq(escrow.available(payer, node), 60, "available");
    }

    function test_thaw_then_withdraw_after_period() public {
        _fund(payer, node, 100);
        vm.expectEmit();
        emit PaymentEscrow.ThawStarted(payer, node, 30, uint64(block.timestamp + THAW));
        vm.prank(payer);
        escrow.thaw(node, 30);
        assertEq(escrow.available(payer, node), 70, "thawing is not available");
        vm.warp(block.timestamp + THAW - 1);
        vm.expectRevert(abi.encodeWithSelector(PaymentEscrow.StillThawing.selector, uint64(block.timestamp + 1)));
        vm.prank(payer);
        escrow.withdraw(node);
        vm.warp(block.timestamp + 1);
        vm.expectEmit();
        emit PaymentEscrow.Withdrawn(payer, node, 30);
        vm.prank(payer);
        escrow.withdraw(node);
        (uint256 balance, uint256 thawing, uint64 endAt) = _account();
        assertEq(balance, 70, "balance");
        assertEq(thawing + endAt, 0, "thaw cleared");
        assertEq(token.balanceOf(payer), 30, "paid back");
    }

    function test_thaw_sets_amount_and_restarts_timer_zero_cancels() public {
        _fund(payer, node, 100);
        vm.prank(payer);
        escrow.thaw(node, 30);
        vm.warp(block.timestamp + THAW / 2);
        vm.prank(payer);
        escrow.thaw(node, 50);
        (, uint256 thawing, uint64 endAt) = _account();
        assertEq(thawing, 50, "amount is set, not added");
        assertEq(endAt, block.timestamp + THAW, "timer restarted");
        vm.prank(payer);
        escrow.thaw(node, 0);
        (, thawing, endAt) = _account();
        assertEq(thawing + endAt, 0, "cancelled");
        vm.expectRevert(PaymentEscrow.NothingThawing.selector);
        vm.prank(payer);
        escrow.withdraw(node);
    }

    function test_collect_lowers_thawing_to_what_is_left() public {
        _fund(payer, node, 100);
        vm.prank(payer);
        escrow.thaw(node, 80);
        _settleOne(1, 50, 50, bytes32("r"), 50);
        (uint256 balance, uint256 thawing,) = _account();
        assertEq(balance, 50, "balance after collect");
        assertEq(thawing, 50, "thawing capped at balance");
        assertEq(token.balanceOf(address(settlement)), 50, "pot");
    }

    function test_revert_collect_by_anyone_but_settlement() public {
        _fund(payer, node, 100);
        vm.expectRevert(abi.encodeWithSelector(PaymentEscrow.NotSettlement.selector, address(this)));
        escrow.collect(payer, node, 1);
    }

    function test_revert_collect_above_balance() public {
        _fund(payer, node, 10);
        Settlement.SignedVoucher memory sv = _sign(PAYER_KEY, _voucher(payer, 0, 11));
        vm.expectRevert(abi.encodeWithSelector(PaymentEscrow.InsufficientBalance.selector, payer, node, 10, 11));
        vm.prank(node);
        settlement.settle(1, _one(sv), _amounts(11), bytes32("r"), 11, bytes32(0), 0);
    }

    function test_revert_zero_and_bad_inputs() public {
        vm.expectRevert(PaymentEscrow.ZeroAmount.selector);
        escrow.deposit(node, 0);
        vm.expectRevert(PaymentEscrow.ZeroAddress.selector);
        escrow.deposit(address(0), 1);
        vm.expectRevert(abi.encodeWithSelector(PaymentEscrow.ThawExceedsBalance.selector, 1, 0));
        escrow.thaw(node, 1);
        vm.expectRevert(PaymentEscrow.ZeroAddress.selector);
        new PaymentEscrow(IERC20(address(0)), THAW, address(1));
        vm.expectRevert(PaymentEscrow.ZeroAddress.selector);
        new PaymentEscrow(token, THAW, address(0));
    }

    function testFuzz_thaw_withdraw_pays_exactly_the_thawing_amount(uint256 deposit, uint256 amount, uint256 wait)
        public
    {
        deposit = bound(deposit, 1, 1e30);
        amount = bound(amount, 1, deposit);
        wait = bound(wait, 0, 3 * THAW);
        _fund(payer, node, deposit);
        vm.prank(payer);
        escrow.thaw(node, amount);
        vm.warp(block.timestamp + wait);
        if (wait < THAW) vm.expectRevert(abi.encodeWithSelector(PaymentEscrow.StillThawing.selector, uint64(block.timestamp - wait + THAW)));
        vm.prank(payer);
        escrow.withdraw(node);
        (uint256 balance,,) = _account();
        uint256 paid = wait < THAW ? 0 : amount;
        assertEq(token.balanceOf(payer), paid, "withdrawn");
        assertEq(balance, deposit - paid, "balance left");
    }
}
