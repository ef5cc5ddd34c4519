// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";
import {Settlement} from "../src/Settlement.sol";
import {Fixture} from "./Fixture.sol";

/// @notice Gas of the calls users pay for, one measured call per test (`vm.lastCallGas`), logged as
/// `gas <name>`. docs/contracts.md's table comes from `forge test --match-contract GasTest -vv --isolate`
/// (isolate: every call is its own transaction, so cold storage is priced as on chain).
contract GasTest is Fixture {
    function _report(string memory name) internal view returns (uint256 used) {
        used = vm.lastCallGas().gasTotalUsed;
        log(string.concat("gas ", name), used);
    }

    /// @dev `n` vouchers for `to` from `n` fresh payers (keys from `firstKey`), each funded.
    function _vouchers(address to, uint256 firstKey, uint256 n)
        internal
        returns (Settlement.SignedVoucher[] memory vs, uint256[] memory amounts)
    {
        vs = new Settlement.SignedVoucher[](n);
        amounts = new uint256[](n);
        for (uint256 i; i < n; ++i) {
            address from = vm.addr(firstKey + i);
            _fund(from, to, 1e18);
            Settlement.Voucher memory v = _voucher(from, 0, 1e15);
            v.node = to;
            vs[i] = _sign(firstKey + i, v);
            amounts[i] = 1e15;
        }
    }

    /// @dev The first epoch of `to`: `n` vouchers, trees over `receiptCount` receipts.
    function _settleGas(address to, uint256 firstKey, uint256 n, uint64 receiptCount, string memory name)
        internal
        returns (uint256)
    {
        (Settlement.SignedVoucher[] memory vs, uint256[] memory amounts) = _vouchers(to, firstKey, n);
        bytes32 root = keccak256(abi.encode(receiptCount));
        vm.prank(to);
        settlement.settle(1, vs, amounts, root, n * 1e15, keccak256(abi.encode(root)), receiptCount);
        return _report(name);
    }

    function test_gas_register_dataset() public {
        datasets.register(bytes32("content"), "ipfs://bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi", node);
        _report("DatasetRegistry.register");
    }

    function test_gas_register_adapter_4_datasets() public {
        uint256[] memory ids = new uint256[](4);
        uint16[] memory w = new uint16[](4);
        for (uint256 i; i < 4; ++i) {
            ids[i] = datasets.register(bytes32(i + 1), "ipfs://x", node);
            w[i] = 2500;
        }
        adapters.register(bytes32("base"), bytes32("weights"), "https://example.org/adapters/a1", ids, w, 2000);
        _report("AdapterRegistry.register (4 datasets)");
    }

    function test_gas_deposit() public {
        token.mint(payer, 1e18);
        vm.prank(payer);
        token.approve(address(escrow), 1e18);
        vm.prank(payer);
        escrow.deposit(node, 1e18);
        _report("PaymentEscrow.deposit");
    }

    function test_gas_settle_1_voucher() public {
        _settleGas(node, 0x1000, 1, 1, "Settlement.settle (1 voucher)");
    }

    function test_gas_settle_10_vouchers() public {
        _settleGas(node, 0x1000, 10, 10, "Settlement.settle (10 vouchers)");
    }

    function test_gas_settle_100_vouchers() public {
        _settleGas(node, 0x1000, 100, 100, "Settlement.settle (100 vouchers)");
    }

    /// The rewards and receipts trees are roots: settle costs the same for 1 receipt or a million.
    function test_gas_settle_independent_of_receipts_and_payees() public {
        token.mint(address(settlement), 1); // both settles then find the pot's balance slot non-zero
        uint256 small = _settleGas(vm.addr(0xA), 0x1000, 10, 1, "Settlement.settle (10 vouchers, 1 receipt)");
        uint256 large = _settleGas(vm.addr(0xB), 0x2000, 10, 1_000_000, "Settlement.settle (10 vouchers, 1M receipts)");
        assertLe(large, small + 100, "settle gas does not grow with receipts or payees");
        assertLe(small, large + 100, "same shape, same gas");
    }

    function _claimGas(uint256 depth, string memory name) internal {
        bytes32[] memory proof = new bytes32[](depth);
        for (uint256 i; i < depth; ++i) proof[i] = keccak256(abi.encode(i));
        address alice = address(0xA11CE);
        bytes32 root = MerkleProof.processProof(proof, _leaf(alice, 1e15));
        _fund(payer, node, 1e18);
        _settleOne(1, 1e15, 1e15, root, 1e15);
        vm.warp(block.timestamp + CHALLENGE);
        settlement.claim(node, 1, alice, 1e15, proof);
        _report(name);
    }

    function test_gas_claim_proof_depth_10() public {
        _claimGas(10, "Settlement.claim (1k payees, proof 10)");
    }

    function test_gas_claim_proof_depth_20() public {
        _claimGas(20, "Settlement.claim (1M payees, proof 20)");
    }

    function test_gas_veto() public {
        _fund(payer, node, 1e18);
        _settleOne(1, 1e15, 1e15, bytes32("root"), 1e15);
        vm.prank(guardian);
        settlement.veto(node, 1);
        _report("Settlement.veto");
    }

    /// The guardian's corrected root after a veto of epoch 1 of 3 (epochs 2 and 3 are forgotten).
    function test_gas_amend() public {
        _fund(payer, node, 1e18);
        _settleOne(1, 1e15, 1e15, bytes32("root"), 1e15);
        _settleOne(2, 2e15, 1e15, bytes32("root"), 2e15);
        _settleOne(3, 3e15, 1e15, bytes32("root"), 3e15);
        vm.prank(guardian);
        settlement.veto(node, 1);
        vm.prank(guardian);
        settlement.amend(node, bytes32("corrected"), 3e15, bytes32("receipts"), 3);
        _report("Settlement.amend");
    }
}
