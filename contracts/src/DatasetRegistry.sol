// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title DatasetRegistry
/// @notice Contributors register datasets by content hash; the owner may later change the URI and the
/// payout address. Ids are sequential from 1. Every change emits an event the indexer mirrors.
contract DatasetRegistry {
    struct Dataset {
        address owner;
        address payout;
        bytes32 contentHash;
        string uri;
    }

    error ZeroContentHash();
    error ZeroPayout();
    error UnknownDataset(uint256 datasetId);
    error NotDatasetOwner(uint256 datasetId, address caller);

    event DatasetRegistered(
        uint256 indexed datasetId, address indexed owner, bytes32 contentHash, string uri, address payout
    );
    event DatasetUpdated(uint256 indexed datasetId, string uri, address payout);

    /// @notice Number of datasets registered; also the id of the latest one.
    uint256 public datasetCount;
    mapping(uint256 datasetId => Dataset) private _datasets;

    function register(bytes32 contentHash, string calldata uri, address payout)
        external
        returns (uint256 datasetId)
    {
        if (contentHash == bytes32(0)) revert ZeroContentHash();
        if (payout == address(0)) revert ZeroPayout();
        datasetId = ++datasetCount;
        _datasets[datasetId] = Dataset(msg.sender, payout, contentHash, uri);
        emit DatasetRegistered(datasetId, msg.sender, contentHash, uri, payout);
    }

    /// @notice The owner changes where the data lives and where its share is paid. The content hash
    /// never changes: a new version of the data is a new dataset.
    function update(uint256 datasetId, string calldata uri, address payout) external {
        Dataset storage d = _dataset(datasetId);
        if (d.owner != msg.sender) revert NotDatasetOwner(datasetId, msg.sender);
        if (payout == address(0)) revert ZeroPayout();
        d.uri = uri;
        d.payout = payout;
        emit DatasetUpdated(datasetId, uri, payout);
    }

    function datasets(uint256 datasetId)
        external
        view
        returns (address owner, address payout, bytes32 contentHash, string memory uri)
    {
        Dataset storage d = _dataset(datasetId);
        return (d.owner, d.payout, d.contentHash, d.uri);
    }

    function exists(uint256 datasetId) public view returns (bool) {
        return datasetId != 0 && datasetId <= datasetCount;
    }

    function _dataset(uint256 datasetId) private view returns (Dataset storage) {
        if (!exists(datasetId)) revert UnknownDataset(datasetId);
        return _datasets[datasetId];
    }
}
