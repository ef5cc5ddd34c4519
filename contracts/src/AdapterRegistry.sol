// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {DatasetRegistry} from "./DatasetRegistry.sol";

/// @title AdapterRegistry
/// @notice Adapter owners register a LoRA adapter with its immutable lineage: the registered datasets
/// it was trained on and their weights (basis points summing to 10,000), the base model it fits and
/// the sha256 of its weights. Only `lineageHash = keccak256(abi.encode(datasetIds, weightsBps))` is
/// stored; the full lineage is in the `AdapterRegistered` event. The owner may deprecate an adapter.
contract AdapterRegistry {
    uint16 public constant BPS = 10_000;
    uint256 public constant MAX_DATASETS = 64;

    struct Adapter {
        address owner;
        uint16 ownerShareBps;
        bool deprecated;
        bytes32 baseModel;
        bytes32 weightsSha256;
        bytes32 lineageHash;
        string uri;
    }

    error ZeroBaseModel();
    error ZeroWeightsSha256();
    error LengthMismatch(uint256 numDatasets, uint256 numWeights);
    error BadDatasetCount(uint256 numDatasets, uint256 maxDatasets);
    error DuplicateDataset(uint256 datasetId);
    error ZeroWeight(uint256 datasetId);
    error WeightsSum(uint256 sumBps);
    error OwnerShareTooHigh(uint16 ownerShareBps);
    error UnknownDataset(uint256 datasetId);
    error UnknownAdapter(uint256 adapterId);
    error NotAdapterOwner(uint256 adapterId, address caller);
    error AlreadyDeprecated(uint256 adapterId);

    event AdapterRegistered(
        uint256 indexed adapterId,
        address indexed owner,
        bytes32 baseModel,
        bytes32 weightsSha256,
        string uri,
        uint256[] datasetIds,
        uint16[] weightsBps,
        uint16 ownerShareBps,
        bytes32 lineageHash
    );
    event AdapterDeprecated(uint256 indexed adapterId);

    DatasetRegistry public immutable datasetRegistry;
    uint256 public adapterCount;
    mapping(uint256 adapterId => Adapter) private _adapters;

    constructor(DatasetRegistry datasetRegistry_) {
        datasetRegistry = datasetRegistry_;
    }

    function register(
        bytes32 baseModel,
        bytes32 weightsSha256,
        string calldata uri,
        uint256[] calldata datasetIds,
        uint16[] calldata weightsBps,
        uint16 ownerShareBps
    ) external returns (uint256 adapterId) {
        if (baseModel == bytes32(0)) revert ZeroBaseModel();
        if (weightsSha256 == bytes32(0)) revert ZeroWeightsSha256();
        if (ownerShareBps > BPS) revert OwnerShareTooHigh(ownerShareBps);
        _checkLineage(datasetIds, weightsBps);
        bytes32 lineage = lineageHash(datasetIds, weightsBps);
        adapterId = ++adapterCount;
        _adapters[adapterId] = Adapter(msg.sender, ownerShareBps, false, baseModel, weightsSha256, lineage, uri);
        emit AdapterRegistered(
            adapterId, msg.sender, baseModel, weightsSha256, uri, datasetIds, weightsBps, ownerShareBps, lineage
        );
    }

    function deprecate(uint256 adapterId) external {
        Adapter storage a = _adapter(adapterId);
        if (a.owner != msg.sender) revert NotAdapterOwner(adapterId, msg.sender);
        if (a.deprecated) revert AlreadyDeprecated(adapterId);
        a.deprecated = true;
        emit AdapterDeprecated(adapterId);
    }

    function adapters(uint256 adapterId)
        external
        view
        returns (
            address owner,
            bytes32 baseModel,
            bytes32 weightsSha256,
            string memory uri,
            uint16 ownerShareBps,
            bytes32 lineage,
            bool deprecated
        )
    {
        Adapter storage a = _adapter(adapterId);
        return (a.owner, a.baseModel, a.weightsSha256, a.uri, a.ownerShareBps, a.lineageHash, a.deprecated);
    }

    function lineageHash(uint256[] calldata datasetIds, uint16[] calldata weightsBps) public pure returns (bytes32) {
        return keccak256(abi.encode(datasetIds, weightsBps));
    }

    function _checkLineage(uint256[] calldata datasetIds, uint16[] calldata weightsBps) private view {
        uint256 n = datasetIds.length;
        if (n != weightsBps.length) revert LengthMismatch(n, weightsBps.length);
        if (n == 0 || n > MAX_DATASETS) revert BadDatasetCount(n, MAX_DATASETS);
        uint256 sum;
        for (uint256 i; i < n; ++i) {
            uint256 id = datasetIds[i];
            if (!datasetRegistry.exists(id)) revert UnknownDataset(id);
            if (weightsBps[i] == 0) revert ZeroWeight(id);
            for (uint256 j; j < i; ++j) {
                if (datasetIds[j] == id) revert DuplicateDataset(id);
            }
            sum += weightsBps[i];
        }
        if (sum != BPS) revert WeightsSum(sum);
    }

    function _adapter(uint256 adapterId) private view returns (Adapter storage) {
        if (adapterId == 0 || adapterId > adapterCount) revert UnknownAdapter(adapterId);
        return _adapters[adapterId];
    }
}
