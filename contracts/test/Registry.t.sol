// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {AdapterRegistry} from "../src/AdapterRegistry.sol";
import {DatasetRegistry} from "../src/DatasetRegistry.sol";
import {Fixture} from "./Fixture.sol";

contract DatasetRegistryTest is Fixture {
    address internal alice = address(0xA1);

    function test_register_assigns_sequential_ids_and_emits() public {
        vm.expectEmit();
        emit DatasetRegistry.DatasetRegistered(1, alice, bytes32("h1"), "ipfs://one", alice);
        vm.prank(alice);
        assertEq(datasets.register(bytes32("h1"), "ipfs://one", alice), 1, "first id");
        vm.prank(alice);
        assertEq(datasets.register(bytes32("h2"), "ipfs://two", address(0xB2)), 2, "second id");
        (address owner, address payout, bytes32 contentHash,) = datasets.datasets(2);
        assertEq(owner, alice, "owner");
        assertEq(payout, address(0xB2), "payout");
        assertEq(contentHash, bytes32("h2"), "content hash");
        assertEq(datasets.datasetCount(), 2, "count");
    }

    function test_owner_updates_uri_and_payout() public {
        vm.prank(alice);
        uint256 id = datasets.register(bytes32("h1"), "ipfs://one", alice);
        vm.expectEmit();
        emit DatasetRegistry.DatasetUpdated(id, "https://two", address(0xC3));
        vm.prank(alice);
        datasets.update(id, "https://two", address(0xC3));
        (, address payout,, string memory uri) = datasets.datasets(id);
        assertEq(payout, address(0xC3), "payout");
        assertEq(keccak256(bytes(uri)), keccak256("https://two"), "uri");
    }

    function test_revert_zero_content_hash() public {
        vm.expectRevert(DatasetRegistry.ZeroContentHash.selector);
        datasets.register(bytes32(0), "u", alice);
    }

    function test_revert_zero_payout() public {
        vm.expectRevert(DatasetRegistry.ZeroPayout.selector);
        datasets.register(bytes32("h"), "u", address(0));
        uint256 id = datasets.register(bytes32("h"), "u", alice);
        vm.expectRevert(DatasetRegistry.ZeroPayout.selector);
        datasets.update(id, "u", address(0));
    }

    function test_revert_update_by_stranger() public {
        vm.prank(alice);
        uint256 id = datasets.register(bytes32("h"), "u", alice);
        vm.expectRevert(abi.encodeWithSelector(DatasetRegistry.NotDatasetOwner.selector, id, address(this)));
        datasets.update(id, "v", alice);
    }

    function test_revert_unknown_dataset() public {
        vm.expectRevert(abi.encodeWithSelector(DatasetRegistry.UnknownDataset.selector, 0));
        datasets.datasets(0);
        vm.expectRevert(abi.encodeWithSelector(DatasetRegistry.UnknownDataset.selector, 1));
        datasets.update(1, "u", alice);
    }
}

contract AdapterRegistryTest is Fixture {
    address internal owner = address(0xAD);

    function setUp() public override {
        super.setUp();
        for (uint256 i; i < 3; ++i) {
            datasets.register(bytes32(i + 1), "u", address(uint160(0xD0 + i)));
        }
    }

    function _ids(uint256 a, uint256 b) internal pure returns (uint256[] memory ids) {
        ids = new uint256[](2);
        (ids[0], ids[1]) = (a, b);
    }

    function _bps(uint16 a, uint16 b) internal pure returns (uint16[] memory w) {
        w = new uint16[](2);
        (w[0], w[1]) = (a, b);
    }

    function _register(uint256[] memory ids, uint16[] memory w, uint16 share) internal returns (uint256) {
        vm.prank(owner);
        return adapters.register(bytes32("base"), bytes32("weights"), "file:///a", ids, w, share);
    }

    function test_register_stores_lineage_hash_and_emits_lineage() public {
        uint256[] memory ids = _ids(1, 3);
        uint16[] memory w = _bps(7000, 3000);
        bytes32 lineage = keccak256(abi.encode(ids, w));
        vm.expectEmit();
        emit AdapterRegistry.AdapterRegistered(
            1, owner, bytes32("base"), bytes32("weights"), "file:///a", ids, w, 2000, lineage
        );
        assertEq(_register(ids, w, 2000), 1, "id");
        (address o, bytes32 base, bytes32 weights,, uint16 share, bytes32 stored, bool deprecated) = adapters.adapters(1);
        assertEq(o, owner, "owner");
        assertEq(base, bytes32("base"), "base model");
        assertEq(weights, bytes32("weights"), "weights sha256");
        assertEq(share, 2000, "owner share");
        assertEq(stored, lineage, "lineage hash");
        assertTrue(!deprecated, "fresh adapter is live");
        assertEq(_register(ids, w, 0), 2, "second id");
    }

    function test_owner_deprecates_once() public {
        uint256 id = _register(_ids(1, 2), _bps(5000, 5000), 0);
        vm.expectEmit();
        emit AdapterRegistry.AdapterDeprecated(id);
        vm.prank(owner);
        adapters.deprecate(id);
        (,,,,,, bool deprecated) = adapters.adapters(id);
        assertTrue(deprecated, "deprecated");
        vm.expectRevert(abi.encodeWithSelector(AdapterRegistry.AlreadyDeprecated.selector, id));
        vm.prank(owner);
        adapters.deprecate(id);
    }

    function test_revert_deprecate_by_stranger_or_unknown() public {
        uint256 id = _register(_ids(1, 2), _bps(5000, 5000), 0);
        vm.expectRevert(abi.encodeWithSelector(AdapterRegistry.NotAdapterOwner.selector, id, address(this)));
        adapters.deprecate(id);
        vm.expectRevert(abi.encodeWithSelector(AdapterRegistry.UnknownAdapter.selector, 9));
        adapters.deprecate(9);
        vm.expectRevert(abi.encodeWithSelector(AdapterRegistry.UnknownAdapter.selector, 0));
        adapters.adapters(0);
    }

    function test_revert_zero_hashes() public {
        vm.expectRevert(AdapterRegistry.ZeroBaseModel.selector);
        adapters.register(bytes32(0), bytes32("w"), "u", _ids(1, 2), _bps(5000, 5000), 0);
        vm.expectRevert(AdapterRegistry.ZeroWeightsSha256.selector);
        adapters.register(bytes32("b"), bytes32(0), "u", _ids(1, 2), _bps(5000, 5000), 0);
    }

    function test_revert_bad_lineage() public {
        vm.expectRevert(abi.encodeWithSelector(AdapterRegistry.OwnerShareTooHigh.selector, 10_001));
        _register(_ids(1, 2), _bps(5000, 5000), 10_001);
        vm.expectRevert(abi.encodeWithSelector(AdapterRegistry.LengthMismatch.selector, 2, 1));
        _register(_ids(1, 2), new uint16[](1), 0);
        vm.expectRevert(abi.encodeWithSelector(AdapterRegistry.BadDatasetCount.selector, 0, 64));
        _register(new uint256[](0), new uint16[](0), 0);
        vm.expectRevert(abi.encodeWithSelector(AdapterRegistry.BadDatasetCount.selector, 65, 64));
        _register(new uint256[](65), new uint16[](65), 0);
        vm.expectRevert(abi.encodeWithSelector(AdapterRegistry.DuplicateDataset.selector, 2));
        _register(_ids(2, 2), _bps(5000, 5000), 0);
        vm.expectRevert(abi.encodeWithSelector(AdapterRegistry.ZeroWeight.selector, 2));
        _register(_ids(1, 2), _bps(10_000, 0), 0);
        vm.expectRevert(abi.encodeWithSelector(AdapterRegistry.WeightsSum.selector, 9999));
        _register(_ids(1, 2), _bps(5000, 4999), 0);
        vm.expectRevert(abi.encodeWithSelector(AdapterRegistry.UnknownDataset.selector, 4));
        _register(_ids(1, 4), _bps(5000, 5000), 0);
        vm.expectRevert(abi.encodeWithSelector(AdapterRegistry.UnknownDataset.selector, 0));
        _register(_ids(0, 1), _bps(5000, 5000), 0);
    }

    function testFuzz_weights_must_sum_to_10000(uint16 a, uint16 b) public {
        a = uint16(bound(a, 1, 10_000));
        b = uint16(bound(b, 1, 10_000));
        if (uint256(a) + b != 10_000) {
            vm.expectRevert(abi.encodeWithSelector(AdapterRegistry.WeightsSum.selector, uint256(a) + b));
        }
        _register(_ids(1, 2), _bps(a, b), 0);
    }
}
