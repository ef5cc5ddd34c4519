// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";
import {Settlement} from "../src/Settlement.sol";
import {Fixture} from "./Fixture.sol";

contract SettlementFuzzTest is Fixture {
    /// secp256k1 group order.
    uint256 internal constant N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141;

    function setUp() public override {
        super.setUp();
        _fund(payer, node, 1e30);
    }

    function _try(Settlement.SignedVoucher memory sv, uint256 amount) internal {
        vm.prank(node);
        settlement.settle(1, _one(sv), _amounts(amount), bytes32("r"), amount, 0, 0);
    }

    function _badSig(Settlement.Voucher memory v) internal {
        vm.expectRevert(abi.encodeWithSelector(Settlement.InvalidVoucherSignature.selector, 0, v.payer));
    }

    function testFuzz_digest_matches_eip712_from_scratch(uint32 lane, uint256 cumulative, bytes32 req) public view {
        Settlement.Voucher memory v = Settlement.Voucher(payer, node, lane, cumulative, req, 123);
        assertEq(settlement.voucherDigest(v), _digest(block.chainid, address(settlement), v), "digest");
    }

    function testFuzz_wrong_signer_is_refused(uint256 key) public {
        key = bound(key, 1, N - 1);
        vm.assume(key != PAYER_KEY);
        Settlement.Voucher memory v = _voucher(payer, 0, 100);
        Settlement.SignedVoucher memory sv = _sign(key, v);
        _badSig(v);
        _try(sv, 100);
    }

    function testFuzz_malleable_s_is_refused(uint32 lane, uint256 cumulative) public {
        cumulative = bound(cumulative, 1, 1e30);
        Settlement.Voucher memory v = _voucher(payer, lane, cumulative);
        (uint8 sv, bytes32 r, bytes32 s) = vm.sign(PAYER_KEY, settlement.voucherDigest(v));
        bytes memory flipped = abi.encodePacked(r, bytes32(N - uint256(s)), sv == 27 ? uint8(28) : uint8(27));
        _badSig(v);
        _try(Settlement.SignedVoucher(v, flipped), cumulative);
        _try(Settlement.SignedVoucher(v, abi.encodePacked(r, s, sv)), cumulative); // the canonical one pays
        assertEq(settlement.collected(payer, node, lane), cumulative, "collected");
    }

    function testFuzz_signature_for_other_chain_or_contract_is_refused(uint256 chainId, address verifying) public {
        vm.assume(chainId != block.chainid || verifying != address(settlement));
        Settlement.Voucher memory v = _voucher(payer, 0, 100);
        (uint8 sv, bytes32 r, bytes32 s) = vm.sign(PAYER_KEY, _digest(chainId, verifying, v));
        _badSig(v);
        _try(Settlement.SignedVoucher(v, abi.encodePacked(r, s, sv)), 100);
    }

    function testFuzz_tampered_voucher_is_refused(uint256 cumulative, bytes32 req) public {
        Settlement.Voucher memory v = _voucher(payer, 0, 100);
        Settlement.SignedVoucher memory signed = _sign(PAYER_KEY, v);
        cumulative = bound(cumulative, 101, type(uint128).max);
        signed.voucher.cumulative = cumulative;
        if (req != v.requestHash) signed.voucher.requestHash = req;
        _badSig(v);
        _try(signed, cumulative);
    }

    function testFuzz_expired_deadline_is_refused(uint64 deadline, uint256 later) public {
        deadline = uint64(bound(deadline, block.timestamp, type(uint64).max - 1));
        later = bound(later, 0, 30 days);
        Settlement.Voucher memory v = _voucher(payer, 0, 100);
        v.deadline = deadline;
        Settlement.SignedVoucher memory sv = _sign(PAYER_KEY, v);
        uint256 at = uint256(deadline) + later;
        vm.warp(at);
        if (at > deadline) vm.expectRevert(abi.encodeWithSelector(Settlement.VoucherExpired.selector, 0, deadline));
        _try(sv, 100);
    }

    /// Collection: over any sequence of (cumulative, amount) on one lane, what is marked collected is
    /// exactly what left escrow, and never above the highest cumulative signed.
    function testFuzz_collection_never_exceeds_cumulative(uint256[4] memory cums, uint256[4] memory amounts) public {
        uint256 marked;
        uint256 highest;
        uint64 epoch;
        for (uint256 i; i < 4; ++i) {
            uint256 cum = bound(cums[i], 0, 1e24);
            uint256 amount = bound(amounts[i], 1, 1e24);
            Settlement.SignedVoucher memory sv = _sign(PAYER_KEY, _voucher(payer, 9, cum));
            uint256 uncollected = cum > marked ? cum - marked : 0;
            if (amount > uncollected) {
                vm.expectRevert(abi.encodeWithSelector(Settlement.AmountExceedsVoucher.selector, 0, amount, uncollected));
            } else {
                marked += amount;
                ++epoch;
            }
            if (cum > highest) highest = cum;
            vm.prank(node);
            settlement.settle(epoch + (amount > uncollected ? 1 : 0), _one(sv), _amounts(amount), bytes32("r"), marked, 0, 0);
        }
        assertEq(settlement.collected(payer, node, 9), marked, "marked");
        assertEq(token.balanceOf(address(settlement)), marked, "moved");
        assertLe(marked, highest, "never above the highest cumulative");
    }

    /// Claims: an account's cumulative leaf grows over two epochs; whatever order it claims in, it ends
    /// with exactly its latest leaf, never more.
    function testFuzz_claims_pay_exactly_the_cumulative_leaf(uint128 first, uint128 more, bool claimFirst) public {
        address alice = address(0xA11);
        address bob = address(0xB0);
        uint256 a1 = bound(first, 1, 1e24);
        uint256 a2 = a1 + bound(more, 1, 1e24);
        bytes32 bob1 = _leaf(bob, 1);
        bytes32 bob2 = _leaf(bob, 2);
        _settleOne(1, a1 + 1, a1 + 1, _pairRoot(_leaf(alice, a1), bob1), a1 + 1);
        _settleOne(2, a2 + 2, a2 - a1 + 1, _pairRoot(_leaf(alice, a2), bob2), a2 + 2);
        vm.warp(block.timestamp + CHALLENGE);
        if (claimFirst) settlement.claim(node, 1, alice, a1, _proof1(bob1));
        settlement.claim(node, 2, alice, a2, _proof1(bob2));
        vm.expectRevert(abi.encodeWithSelector(Settlement.NothingToClaim.selector, node, alice, a1, a2));
        settlement.claim(node, 1, alice, a1, _proof1(bob1));
        assertEq(token.balanceOf(alice), a2, "alice has exactly her latest leaf");
        assertLe(settlement.paidOut(node), settlement.rewardsTotal(node), "paid <= collected");
    }

    /// Any proof of any depth verifies on chain exactly when OZ's MerkleProof says so.
    function testFuzz_claim_with_deep_proof(bytes32[8] memory siblings, uint256 amount) public {
        amount = bound(amount, 1, 1e24);
        bytes32[] memory proof = new bytes32[](8);
        for (uint256 i; i < 8; ++i) proof[i] = siblings[i];
        bytes32 root = MerkleProof.processProof(proof, _leaf(address(0xA11), amount));
        _settleOne(1, amount, amount, root, amount);
        vm.warp(block.timestamp + CHALLENGE);
        settlement.claim(node, 1, address(0xA11), amount, proof);
        assertEq(token.balanceOf(address(0xA11)), amount, "paid");
    }
}
