// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {IERC1271} from "@openzeppelin/contracts/interfaces/IERC1271.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {PaymentEscrow} from "./PaymentEscrow.sol";
import {X402Channels} from "./X402Channels.sol";

/// @title X402Router
/// @notice One node's x402 receiver (`payTo`): what its channels pay reaches the node's Settlement pot and
/// nowhere else (docs/x402.md). The router claims as the channels' receiver, sweeps what the channel
/// contract owes it and deposits it into `PaymentEscrow` as payer "router" for its node. It never thaws,
/// so that escrow account can only be collected by `Settlement`, into this node's pot: the node signs an
/// ordinary lane voucher with payer = this router (ERC-1271: a signature is the router's when it recovers
/// to the node), and swept x402 funds enter the same epochs, trees and split as lane collections.
contract X402Router is IERC1271 {
    using SafeERC20 for IERC20;

    address public immutable node;
    X402Channels public immutable channels;
    PaymentEscrow public immutable escrow;
    IERC20 public immutable token;

    error NotNode(address caller);

    event Swept(uint256 amount);

    constructor(address node_, X402Channels channels_, PaymentEscrow escrow_) {
        node = node_;
        channels = channels_;
        escrow = escrow_;
        token = escrow_.token();
    }

    /// @notice The node claims `voucherClaims` (this router is their receiver) and sweeps, in one call.
    function collect(X402Channels.VoucherClaim[] calldata voucherClaims) external returns (uint256 swept) {
        if (msg.sender != node) revert NotNode(msg.sender);
        channels.claim(voucherClaims);
        return sweep();
    }

    /// @notice Anyone: moves what the channel contract owes this router, and anything it holds, into the
    /// node's escrow account. Money only moves towards the node's pot.
    function sweep() public returns (uint256 amount) {
        channels.settle(address(this), address(token));
        amount = token.balanceOf(address(this));
        if (amount == 0) return 0;
        token.forceApprove(address(escrow), amount);
        escrow.deposit(node, amount);
        emit Swept(amount);
    }

    /// @notice A signature is this router's when it recovers to the node (for Settlement's lane vouchers).
    function isValidSignature(bytes32 hash, bytes calldata signature) external view returns (bytes4) {
        (address signer, ECDSA.RecoverError err,) = ECDSA.tryRecover(hash, signature);
        return err == ECDSA.RecoverError.NoError && signer == node ? IERC1271.isValidSignature.selector : bytes4(0xffffffff);
    }
}
