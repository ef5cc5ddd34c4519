// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";
import {AdapterRegistry} from "../src/AdapterRegistry.sol";
import {DatasetRegistry} from "../src/DatasetRegistry.sol";
import {DemoToken} from "../src/DemoToken.sol";
import {PaymentEscrow} from "../src/PaymentEscrow.sol";
import {Settlement} from "../src/Settlement.sol";
import {TestBase} from "./TestBase.sol";

/// @notice Deploys the whole system the way node/chain/deploy.py does, plus voucher and tree helpers.
abstract contract Fixture is TestBase {
    uint64 internal constant THAW = 1 days;
    uint64 internal constant CHALLENGE = 1 hours;
    uint16 internal constant PROTOCOL_BPS = 500;
    uint16 internal constant NODE_BPS = 1000;
    uint256 internal constant PAYER_KEY = 0xA11CE;
    uint256 internal constant NODE_KEY = 0xB0B;
    bytes32 internal constant VOUCHER_TYPEHASH = keccak256(
        "Voucher(address payer,address node,uint32 lane,uint256 cumulative,bytes32 requestHash,uint64 deadline)"
    );

    DemoToken internal token;
    DatasetRegistry internal datasets;
    AdapterRegistry internal adapters;
    PaymentEscrow internal escrow;
    Settlement internal settlement;
    address internal guardian = address(0x6A4D);
    address internal treasury = address(0x7EA5);
    address internal payer;
    address internal node;

    function setUp() public virtual {
        vm.warp(1_700_000_000);
        payer = vm.addr(PAYER_KEY);
        node = vm.addr(NODE_KEY);
        token = new DemoToken();
        datasets = new DatasetRegistry();
        adapters = new AdapterRegistry(datasets);
        address predicted = vm.computeCreateAddress(address(this), vm.getNonce(address(this)) + 1);
        escrow = new PaymentEscrow(token, THAW, predicted);
        settlement = new Settlement(token, escrow, treasury, PROTOCOL_BPS, NODE_BPS, guardian, CHALLENGE);
        assertEq(address(settlement), predicted, "settlement address");
    }

    function _fund(address who, address to, uint256 amount) internal {
        token.mint(who, amount);
        vm.startPrank(who);
        token.approve(address(escrow), amount);
        escrow.deposit(to, amount);
        vm.stopPrank();
    }

    function _voucher(address from, uint32 lane, uint256 cumulative) internal view returns (Settlement.Voucher memory) {
        return Settlement.Voucher(from, node, lane, cumulative, keccak256("request"), uint64(block.timestamp + 1 days));
    }

    function _sign(uint256 key, Settlement.Voucher memory v) internal view returns (Settlement.SignedVoucher memory) {
        (uint8 sv, bytes32 r, bytes32 s) = vm.sign(key, settlement.voucherDigest(v));
        return Settlement.SignedVoucher(v, abi.encodePacked(r, s, sv));
    }

    /// @dev The EIP-712 digest computed from scratch, for any chain id and verifying contract.
    function _digest(uint256 chainId, address verifying, Settlement.Voucher memory v) internal pure returns (bytes32) {
        bytes32 domain = keccak256(
            abi.encode(
                keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"),
                keccak256("loranode"),
                keccak256("1"),
                chainId,
                verifying
            )
        );
        bytes32 structHash =
            keccak256(abi.encode(VOUCHER_TYPEHASH, v.payer, v.node, v.lane, v.cumulative, v.requestHash, v.deadline));
        return keccak256(abi.encodePacked("\x19\x01", domain, structHash));
    }

    function _one(Settlement.SignedVoucher memory sv) internal pure returns (Settlement.SignedVoucher[] memory out) {
        out = new Settlement.SignedVoucher[](1);
        out[0] = sv;
    }

    function _amounts(uint256 a) internal pure returns (uint256[] memory out) {
        out = new uint256[](1);
        out[0] = a;
    }

    /// @dev Settles one voucher of `payer` on lane 0 as `node`, with `root` for rewards.
    function _settleOne(uint64 epochId, uint256 cumulative, uint256 amount, bytes32 root, uint256 total) internal {
        Settlement.SignedVoucher memory sv = _sign(PAYER_KEY, _voucher(payer, 0, cumulative));
        vm.prank(node);
        settlement.settle(epochId, _one(sv), _amounts(amount), root, total, keccak256("receipts"), 1);
    }

    function _leaf(address account, uint256 cumulative) internal pure returns (bytes32) {
        return keccak256(bytes.concat(keccak256(abi.encode(account, cumulative))));
    }

    /// @dev A two-leaf rewards tree; the proof of each leaf is the other leaf.
    function _pairRoot(bytes32 a, bytes32 b) internal pure returns (bytes32) {
        bytes32[] memory proof = new bytes32[](1);
        proof[0] = b;
        return MerkleProof.processProof(proof, a);
    }

    function _proof1(bytes32 sibling) internal pure returns (bytes32[] memory proof) {
        proof = new bytes32[](1);
        proof[0] = sibling;
    }
}
