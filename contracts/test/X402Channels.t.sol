// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {DemoToken3009} from "../src/DemoToken3009.sol";
import {ERC3009Collector} from "../src/ERC3009Collector.sol";
import {X402Channels} from "../src/X402Channels.sol";
import {X402Fixture} from "./X402Fixture.sol";

/// @notice The channel contract rule by rule, and the attacks of docs/x402.md's money rules.
contract X402ChannelsTest is X402Fixture {
    function setUp() public {
        vm.warp(1_700_000_000);
        _deployChannels();
    }

    function test_channel_id_is_the_eip712_digest_under_the_canonical_domain() public view {
        X402Channels.ChannelConfig memory cfg = _cfg();
        bytes32 domain = keccak256(
            abi.encode(
                keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"),
                keccak256("x402 Batch Settlement"),
                keccak256("1"),
                block.chainid,
                CANONICAL_CHANNELS
            )
        );
        bytes32 structHash = keccak256(
            abi.encode(
                keccak256(
                    "ChannelConfig(address payer,address payerAuthorizer,address receiver,address receiverAuthorizer,address token,uint40 withdrawDelay,bytes32 salt)"
                ),
                cfg.payer, cfg.payerAuthorizer, cfg.receiver, cfg.receiverAuthorizer, cfg.token, cfg.withdrawDelay, cfg.salt
            )
        );
        assertEq(channels.getChannelId(cfg), keccak256(abi.encodePacked("\x19\x01", domain, structHash)), "channel id");
        assertEq(channels.domainSeparator(), domain, "domain separator at the canonical address");
    }

    function test_deposit_through_the_erc3009_collector_opens_the_channel() public {
        _deposit(_cfg(), 1000);
        (uint128 balance, uint128 claimed) = _channel(_cfg());
        assertEq(balance, 1000, "balance");
        assertEq(claimed, 0, "claimed");
        assertEq(usd.balanceOf(address(channels)), 1000, "tokens held");
        assertEq(usd.balanceOf(xpayer), 0, "payer paid");
    }

    function test_an_authorization_funds_only_the_channel_it_names() public {
        X402Channels.ChannelConfig memory mine = _cfg();
        X402Channels.ChannelConfig memory theirs = _config(address(0xBAD), bytes32(0));
        usd.mint(xpayer, 500);
        bytes memory auth = _authorization(X_PAYER_KEY, mine, 500, 7);
        vm.expectRevert(abi.encodeWithSelector(DemoToken3009.InvalidAuthorizationSignature.selector, xpayer));
        channels.deposit(theirs, 500, address(collector), auth);
        channels.deposit(mine, 500, address(collector), auth);
        vm.expectRevert(abi.encodeWithSelector(DemoToken3009.AuthorizationUsed.selector, xpayer, keccak256(abi.encode(channels.getChannelId(mine), uint256(7)))));
        channels.deposit(mine, 500, address(collector), auth);
    }

    function test_a_deposit_signed_by_someone_else_moves_nothing() public {
        usd.mint(xpayer, 500);
        bytes memory forged = _authorization(0xBEEF, _cfg(), 500, 1);
        vm.expectRevert(abi.encodeWithSelector(DemoToken3009.InvalidAuthorizationSignature.selector, xpayer));
        channels.deposit(_cfg(), 500, address(collector), forged);
    }

    function test_a_collector_that_brings_less_than_it_says_is_refused() public {
        LyingCollector liar = new LyingCollector();
        vm.expectRevert(abi.encodeWithSelector(X402Channels.DepositShort.selector, 500, 0));
        channels.deposit(_cfg(), 500, address(liar), "");
    }

    function test_only_the_channel_contract_may_use_the_collector() public {
        vm.expectRevert(abi.encodeWithSelector(ERC3009Collector.NotChannels.selector, address(this)));
        collector.collect(xpayer, address(usd), 1, bytes32(0), "");
    }

    function test_withdraw_delay_must_be_in_bounds() public {
        X402Channels.ChannelConfig memory cfg = _cfg();
        cfg.withdrawDelay = 899;
        vm.expectRevert(abi.encodeWithSelector(X402Channels.WithdrawDelayOutOfRange.selector, uint40(899)));
        channels.deposit(cfg, 1, address(collector), "");
    }

    function test_the_receiver_claims_within_the_voucher_and_settles() public {
        _deposit(_cfg(), 1000);
        X402Channels.VoucherClaim[] memory rows = _rows(_claimRow(_cfg(), 400, 300, X_PAYER_KEY));
        vm.prank(receiver);
        channels.claim(rows);
        (, uint128 claimed) = _channel(_cfg());
        assertEq(claimed, 300, "claimed");
        assertEq(usd.balanceOf(receiver), 0, "claiming moves no token");
        channels.settle(receiver, address(usd));
        assertEq(usd.balanceOf(receiver), 300, "settled");
        channels.settle(receiver, address(usd));
        assertEq(usd.balanceOf(receiver), 300, "a second settle pays nothing more");
    }

    function test_a_stranger_cannot_claim() public {
        _deposit(_cfg(), 1000);
        X402Channels.VoucherClaim[] memory rows = _rows(_claimRow(_cfg(), 400, 300, X_PAYER_KEY));
        vm.prank(address(0xBAD));
        vm.expectRevert(abi.encodeWithSelector(X402Channels.NotReceiver.selector, address(0xBAD)));
        channels.claim(rows);
    }

    function test_a_claim_above_the_voucher_or_the_deposit_reverts() public {
        _deposit(_cfg(), 1000);
        bytes32 id = channels.getChannelId(_cfg());
        X402Channels.VoucherClaim[] memory above = _rows(_claimRow(_cfg(), 400, 401, X_PAYER_KEY));
        vm.startPrank(receiver);
        vm.expectRevert(abi.encodeWithSelector(X402Channels.ClaimAboveVoucher.selector, id, uint128(401), uint128(400)));
        channels.claim(above);
        X402Channels.VoucherClaim[] memory overDeposit = _rows(_claimRow(_cfg(), 5000, 1001, X_PAYER_KEY));
        vm.expectRevert(abi.encodeWithSelector(X402Channels.ClaimAboveBalance.selector, id, uint128(1001), uint128(1000)));
        channels.claim(overDeposit);
        vm.stopPrank();
    }

    function test_a_replayed_or_older_voucher_never_lowers_or_repeats_a_claim() public {
        _deposit(_cfg(), 1000);
        bytes32 id = channels.getChannelId(_cfg());
        X402Channels.VoucherClaim[] memory first = _rows(_claimRow(_cfg(), 400, 400, X_PAYER_KEY));
        vm.startPrank(receiver);
        channels.claim(first);
        channels.claim(first);
        (, uint128 claimed) = _channel(_cfg());
        assertEq(claimed, 400, "the same claim twice is a no-op");
        X402Channels.VoucherClaim[] memory later = _rows(_claimRow(_cfg(), 700, 700, X_PAYER_KEY));
        channels.claim(later);
        X402Channels.VoucherClaim[] memory older = _rows(_claimRow(_cfg(), 400, 400, X_PAYER_KEY));
        vm.expectRevert(abi.encodeWithSelector(X402Channels.ClaimBelowClaimed.selector, id, uint128(400), uint128(700)));
        channels.claim(older);
        vm.stopPrank();
        (uint128 totalClaimed,) = channels.receivers(receiver, address(usd));
        assertEq(totalClaimed, 700, "receiver total");
    }

    function test_a_voucher_for_another_channel_or_signer_is_refused() public {
        X402Channels.ChannelConfig memory other = _config(receiver, bytes32(uint256(1)));
        _deposit(_cfg(), 1000);
        bytes memory sigForOther = _sig(X_PAYER_KEY, channels.getVoucherDigest(channels.getChannelId(other), 400));
        X402Channels.VoucherClaim[] memory rows =
            _rows(X402Channels.VoucherClaim(X402Channels.Voucher(_cfg(), 400), sigForOther, 100));
        bytes32 id = channels.getChannelId(_cfg());
        vm.startPrank(receiver);
        vm.expectRevert(abi.encodeWithSelector(X402Channels.InvalidVoucherSignature.selector, id));
        channels.claim(rows);
        X402Channels.VoucherClaim[] memory forged = _rows(_claimRow(_cfg(), 400, 100, 0xBEEF));
        vm.expectRevert(abi.encodeWithSelector(X402Channels.InvalidVoucherSignature.selector, id));
        channels.claim(forged);
        vm.stopPrank();
    }

    function test_claim_with_signature_needs_the_receiver_authorizer() public {
        _deposit(_cfg(), 1000);
        X402Channels.VoucherClaim[] memory rows = _rows(_claimRow(_cfg(), 400, 250, X_PAYER_KEY));
        bytes32 digest = channels.getClaimBatchDigest(rows);
        vm.expectRevert(abi.encodeWithSelector(X402Channels.InvalidAuthorizerSignature.selector, authorizer));
        channels.claimWithSignature(rows, _sig(0xBEEF, digest));
        vm.prank(address(0x1234));
        channels.claimWithSignature(rows, _sig(AUTHORIZER_KEY, digest));
        (, uint128 claimed) = _channel(_cfg());
        assertEq(claimed, 250, "relayed claim");
    }

    function test_a_claim_batch_shares_one_receiver_authorizer() public {
        X402Channels.ChannelConfig memory other = _cfg();
        other.receiverAuthorizer = address(0xA8);
        X402Channels.VoucherClaim[] memory rows = new X402Channels.VoucherClaim[](2);
        rows[0] = _claimRow(_cfg(), 1, 1, X_PAYER_KEY);
        rows[1] = _claimRow(other, 1, 1, X_PAYER_KEY);
        vm.expectRevert(abi.encodeWithSelector(X402Channels.AuthorizerMismatch.selector, 1, address(0xA8)));
        channels.claimWithSignature(rows, "");
    }

    function test_refund_returns_only_the_unclaimed_part_and_advances_the_nonce() public {
        _deposit(_cfg(), 1000);
        X402Channels.VoucherClaim[] memory rows = _rows(_claimRow(_cfg(), 600, 600, X_PAYER_KEY));
        vm.startPrank(receiver);
        channels.claim(rows);
        channels.refund(_cfg(), 10_000);
        vm.stopPrank();
        bytes32 id = channels.getChannelId(_cfg());
        assertEq(usd.balanceOf(xpayer), 400, "refunded the unclaimed part");
        assertEq(channels.refundNonce(id), 1, "nonce");
        vm.prank(authorizer);
        channels.refund(_cfg(), 1);
        assertEq(channels.refundNonce(id), 2, "a refund with nothing left still advances the nonce");
        channels.settle(receiver, address(usd));
        assertEq(usd.balanceOf(receiver), 600, "the claimed part stays the receiver's");
    }

    function test_refund_with_signature_is_bound_to_nonce_and_amount() public {
        _deposit(_cfg(), 1000);
        bytes32 id = channels.getChannelId(_cfg());
        bytes memory sig = _sig(AUTHORIZER_KEY, channels.getRefundDigest(id, 0, 300));
        vm.expectRevert(abi.encodeWithSelector(X402Channels.InvalidAuthorizerSignature.selector, authorizer));
        channels.refundWithSignature(_cfg(), 301, 0, sig);
        channels.refundWithSignature(_cfg(), 300, 0, sig);
        assertEq(usd.balanceOf(xpayer), 300, "refunded");
        vm.expectRevert(abi.encodeWithSelector(X402Channels.BadRefundNonce.selector, id, 1, 0));
        channels.refundWithSignature(_cfg(), 300, 0, sig);
    }

    function test_a_stranger_cannot_refund() public {
        vm.prank(xpayer);
        vm.expectRevert(abi.encodeWithSelector(X402Channels.NotReceiver.selector, xpayer));
        channels.refund(_cfg(), 1);
    }

    function test_withdraw_after_being_served_cannot_take_what_was_claimed_in_the_delay() public {
        _deposit(_cfg(), 1000);
        vm.prank(xpayer);
        channels.initiateWithdraw(_cfg(), 1000);
        X402Channels.VoucherClaim[] memory served = _rows(_claimRow(_cfg(), 700, 700, X_PAYER_KEY));
        vm.prank(receiver);
        channels.claim(served);
        bytes32 id = channels.getChannelId(_cfg());
        vm.prank(xpayer);
        vm.expectRevert(abi.encodeWithSelector(X402Channels.WithdrawNotReady.selector, id, block.timestamp + DELAY));
        channels.finalizeWithdraw(_cfg());
        vm.warp(block.timestamp + DELAY);
        vm.prank(xpayer);
        channels.finalizeWithdraw(_cfg());
        assertEq(usd.balanceOf(xpayer), 300, "the payer gets only the unclaimed part");
        channels.settle(receiver, address(usd));
        assertEq(usd.balanceOf(receiver), 700, "the receiver keeps what it claimed");
    }

    function test_withdraw_rules() public {
        _deposit(_cfg(), 1000);
        bytes32 id = channels.getChannelId(_cfg());
        vm.prank(receiver);
        vm.expectRevert(abi.encodeWithSelector(X402Channels.NotPayer.selector, receiver));
        channels.initiateWithdraw(_cfg(), 1);
        vm.startPrank(xpayer);
        vm.expectRevert(abi.encodeWithSelector(X402Channels.WithdrawAboveAvailable.selector, id, uint128(1001), uint128(1000)));
        channels.initiateWithdraw(_cfg(), 1001);
        vm.expectRevert(abi.encodeWithSelector(X402Channels.NoPendingWithdrawal.selector, id));
        channels.finalizeWithdraw(_cfg());
        channels.initiateWithdraw(_cfg(), 500);
        vm.stopPrank();
        vm.prank(receiver);
        channels.refund(_cfg(), 200);
        (uint128 pending,) = channels.pendingWithdrawals(id);
        assertEq(pending, 300, "a refund shrinks the pending withdrawal");
        vm.prank(receiver);
        channels.refund(_cfg(), 300);
        (pending,) = channels.pendingWithdrawals(id);
        assertEq(pending, 0, "and cancels it when it covers it");
    }

    function test_channels_are_separate_accounts() public {
        X402Channels.ChannelConfig memory other = _config(address(0x0DD), bytes32(uint256(2)));
        _deposit(_cfg(), 1000);
        _deposit(other, 50);
        X402Channels.VoucherClaim[] memory beyond = _rows(_claimRow(other, 60, 60, X_PAYER_KEY));
        X402Channels.VoucherClaim[] memory all = _rows(_claimRow(other, 50, 50, X_PAYER_KEY));
        bytes memory err =
            abi.encodeWithSelector(X402Channels.ClaimAboveBalance.selector, channels.getChannelId(other), uint128(60), uint128(50));
        vm.startPrank(address(0x0DD));
        vm.expectRevert(err);
        channels.claim(beyond);
        channels.claim(all);
        vm.stopPrank();
        channels.settle(address(0x0DD), address(usd));
        assertEq(usd.balanceOf(address(0x0DD)), 50, "the other receiver got its channel's funds");
        assertEq(usd.balanceOf(address(channels)), 1000, "this channel's funds are untouched");
    }
}

/// @dev Claims to have collected a deposit and brings nothing.
contract LyingCollector {
    function collect(address, address, uint256, bytes32, bytes calldata) external pure {}
}
