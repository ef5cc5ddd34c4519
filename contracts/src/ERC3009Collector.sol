// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";

/// @notice What the channel contract asks of a deposit collector: bring exactly `amount` of `token`
/// from `payer` into the channel contract for `channelId` (the channel contract measures it).
interface IDepositCollector {
    function collect(address payer, address token, uint256 amount, bytes32 channelId, bytes calldata data) external;
}

/// @notice ERC-3009 `receiveWithAuthorization` with a bytes signature (USDC's and DemoToken3009's).
interface IERC3009 {
    function receiveWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes calldata signature
    ) external;
}

/// @title ERC3009Collector
/// @notice Pulls a payer's deposit with its ERC-3009 authorization (to = this collector) and hands it to
/// the channel contract. The authorization's nonce is `keccak256(abi.encode(channelId, salt))`, so it
/// funds the one channel it names and no other. `data` = abi.encode(validAfter, validBefore, salt,
/// signature). Only the channel contract may call it; `channels` is an immutable, so the copy of this
/// code at the canonical address serves the canonical channel contract (docs/x402.md).
contract ERC3009Collector is IDepositCollector {
    using SafeERC20 for IERC20;

    address public immutable channels;

    error NotChannels(address caller);

    constructor(address channels_) {
        channels = channels_;
    }

    function collect(address payer, address token, uint256 amount, bytes32 channelId, bytes calldata data) external {
        if (msg.sender != channels) revert NotChannels(msg.sender);
        (uint256 validAfter, uint256 validBefore, uint256 salt, bytes memory signature) =
            abi.decode(data, (uint256, uint256, uint256, bytes));
        bytes32 nonce = keccak256(abi.encode(channelId, salt));
        IERC3009(token).receiveWithAuthorization(payer, address(this), amount, validAfter, validBefore, nonce, signature);
        IERC20(token).safeTransfer(channels, amount);
    }
}
