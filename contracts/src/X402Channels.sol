// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {SignatureChecker} from "@openzeppelin/contracts/utils/cryptography/SignatureChecker.sol";
import {Multicall} from "@openzeppelin/contracts/utils/Multicall.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";
import {IDepositCollector} from "./ERC3009Collector.sol";

/// @title X402Channels
/// @notice Our implementation of the x402 `batch-settlement` channel contract, to its published interface
/// (docs/x402.md). A channel is identified by the EIP-712 hash of its immutable config; it holds the
/// payer's `balance` and the receiver's cumulative `totalClaimed` (never above the balance, never above a
/// voucher the payer signed). Claims only move accounting; `settle` pays a receiver everything claimed
/// for it. The payer leaves by a cooperative refund or a timed withdrawal that can never take what was
/// claimed. It keeps no constructor storage, so its code can serve from the canonical address on anvil.
contract X402Channels is EIP712, Multicall, ReentrancyGuardTransient {
    using SafeERC20 for IERC20;

    struct ChannelConfig {
        address payer;
        address payerAuthorizer;
        address receiver;
        address receiverAuthorizer;
        address token;
        uint40 withdrawDelay;
        bytes32 salt;
    }

    struct Voucher {
        ChannelConfig channel;
        uint128 maxClaimableAmount;
    }

    struct VoucherClaim {
        Voucher voucher;
        bytes signature;
        uint128 totalClaimed;
    }

    struct Channel {
        uint128 balance;
        uint128 totalClaimed;
    }

    struct PendingWithdrawal {
        uint128 amount;
        uint40 initiatedAt;
    }

    struct ReceiverTotals {
        uint128 totalClaimed;
        uint128 totalSettled;
    }

    bytes32 public constant CHANNEL_CONFIG_TYPEHASH = keccak256(
        "ChannelConfig(address payer,address payerAuthorizer,address receiver,address receiverAuthorizer,address token,uint40 withdrawDelay,bytes32 salt)"
    );
    bytes32 public constant VOUCHER_TYPEHASH = keccak256("Voucher(bytes32 channelId,uint128 maxClaimableAmount)");
    bytes32 public constant REFUND_TYPEHASH = keccak256("Refund(bytes32 channelId,uint256 nonce,uint128 amount)");
    bytes32 public constant CLAIM_ENTRY_TYPEHASH =
        keccak256("ClaimEntry(bytes32 channelId,uint128 maxClaimableAmount,uint128 totalClaimed)");
    bytes32 public constant CLAIM_BATCH_TYPEHASH = keccak256(
        "ClaimBatch(ClaimEntry[] claims)ClaimEntry(bytes32 channelId,uint128 maxClaimableAmount,uint128 totalClaimed)"
    );
    uint40 public constant MIN_WITHDRAW_DELAY = 900;
    uint40 public constant MAX_WITHDRAW_DELAY = 2_592_000;

    error ZeroAddress();
    error ZeroAmount();
    error WithdrawDelayOutOfRange(uint40 withdrawDelay);
    error DepositShort(uint256 amount, uint256 received);
    error NotReceiver(address caller);
    error NotPayer(address caller);
    error EmptyBatch();
    error AuthorizerMismatch(uint256 index, address authorizer);
    error InvalidAuthorizerSignature(address authorizer);
    error InvalidVoucherSignature(bytes32 channelId);
    error ClaimBelowClaimed(bytes32 channelId, uint128 totalClaimed, uint128 claimed);
    error ClaimAboveVoucher(bytes32 channelId, uint128 totalClaimed, uint128 maxClaimableAmount);
    error ClaimAboveBalance(bytes32 channelId, uint128 totalClaimed, uint128 balance);
    error BadRefundNonce(bytes32 channelId, uint256 expected, uint256 nonce);
    error WithdrawAboveAvailable(bytes32 channelId, uint128 amount, uint128 available);
    error NoPendingWithdrawal(bytes32 channelId);
    error WithdrawNotReady(bytes32 channelId, uint256 readyAt);

    event ChannelCreated(bytes32 indexed channelId, ChannelConfig config);
    event ChannelClosed(bytes32 indexed channelId, ChannelConfig config);
    event Deposited(bytes32 indexed channelId, address indexed payer, uint128 amount, uint128 balance);
    event Claimed(bytes32 indexed channelId, address indexed receiver, uint128 totalClaimed, uint128 amount);
    event Settled(address indexed receiver, address indexed token, address indexed sender, uint128 amount);
    event Refunded(bytes32 indexed channelId, uint128 amount, uint256 nextNonce);
    event WithdrawInitiated(bytes32 indexed channelId, uint128 amount, uint256 readyAt);
    event Withdrawn(bytes32 indexed channelId, uint128 amount);

    mapping(bytes32 channelId => Channel) public channels;
    mapping(bytes32 channelId => PendingWithdrawal) public pendingWithdrawals;
    mapping(address receiver => mapping(address token => ReceiverTotals)) public receivers;
    mapping(bytes32 channelId => uint256) public refundNonce;

    constructor() EIP712("x402 Batch Settlement", "1") {}

    /// @notice Funds the channel of `config` with exactly `amount`, brought by `collector` (for ERC-3009:
    /// the payer's authorization in `collectorData`). The channel exists from its first deposit.
    function deposit(ChannelConfig calldata config, uint128 amount, address collector, bytes calldata collectorData)
        external
        nonReentrant
    {
        _checkConfig(config);
        if (amount == 0) revert ZeroAmount();
        bytes32 id = getChannelId(config);
        IERC20 token = IERC20(config.token);
        uint256 before = token.balanceOf(address(this));
        IDepositCollector(collector).collect(config.payer, config.token, amount, id, collectorData);
        uint256 received = token.balanceOf(address(this)) - before;
        if (received != amount) revert DepositShort(amount, received);
        Channel storage c = channels[id];
        if (c.balance == 0 && c.totalClaimed == 0) emit ChannelCreated(id, config);
        c.balance += amount;
        emit Deposited(id, config.payer, amount, c.balance);
    }

    /// @notice Raises each row's channel to `totalClaimed`; the caller is every row's receiver or
    /// receiver authorizer. No token moves.
    function claim(VoucherClaim[] calldata voucherClaims) external nonReentrant {
        for (uint256 i; i < voucherClaims.length; ++i) {
            ChannelConfig calldata cfg = voucherClaims[i].voucher.channel;
            if (msg.sender != cfg.receiver && msg.sender != cfg.receiverAuthorizer) revert NotReceiver(msg.sender);
            _claim(voucherClaims[i], getChannelId(cfg));
        }
    }

    /// @notice The relayable claim: anyone submits it with one `ClaimBatch` signature of the rows'
    /// common receiver authorizer.
    function claimWithSignature(VoucherClaim[] calldata voucherClaims, bytes calldata authorizerSignature)
        external
        nonReentrant
    {
        uint256 n = voucherClaims.length;
        if (n == 0) revert EmptyBatch();
        address authorizer = voucherClaims[0].voucher.channel.receiverAuthorizer;
        bytes32[] memory ids = new bytes32[](n);
        for (uint256 i; i < n; ++i) {
            if (voucherClaims[i].voucher.channel.receiverAuthorizer != authorizer) {
                revert AuthorizerMismatch(i, voucherClaims[i].voucher.channel.receiverAuthorizer);
            }
            ids[i] = getChannelId(voucherClaims[i].voucher.channel);
        }
        if (!SignatureChecker.isValidSignatureNow(authorizer, _claimBatchDigest(voucherClaims, ids), authorizerSignature)) {
            revert InvalidAuthorizerSignature(authorizer);
        }
        for (uint256 i; i < n; ++i) {
            _claim(voucherClaims[i], ids[i]);
        }
    }

    /// @notice Pays `receiver` everything claimed for it in `token` and not paid yet. Anyone may call it.
    function settle(address receiver, address token) external nonReentrant {
        ReceiverTotals storage r = receivers[receiver][token];
        uint128 amount = r.totalClaimed - r.totalSettled;
        if (amount == 0) return;
        r.totalSettled = r.totalClaimed;
        IERC20(token).safeTransfer(receiver, amount);
        emit Settled(receiver, token, msg.sender, amount);
    }

    /// @notice Cooperative refund by the receiver side: returns up to the unclaimed balance to the payer.
    function refund(ChannelConfig calldata config, uint128 amount) external nonReentrant {
        if (msg.sender != config.receiver && msg.sender != config.receiverAuthorizer) revert NotReceiver(msg.sender);
        _refund(config, getChannelId(config), amount);
    }

    /// @notice The relayable refund: the receiver authorizer's `Refund` signature for the current nonce.
    function refundWithSignature(
        ChannelConfig calldata config,
        uint128 amount,
        uint256 nonce,
        bytes calldata receiverAuthorizerSignature
    ) external nonReentrant {
        bytes32 id = getChannelId(config);
        if (nonce != refundNonce[id]) revert BadRefundNonce(id, refundNonce[id], nonce);
        bytes32 digest = getRefundDigest(id, nonce, amount);
        if (!SignatureChecker.isValidSignatureNow(config.receiverAuthorizer, digest, receiverAuthorizerSignature)) {
            revert InvalidAuthorizerSignature(config.receiverAuthorizer);
        }
        _refund(config, id, amount);
    }

    /// @notice The payer's escape hatch, step 1: `amount` (at most the unclaimed balance) becomes
    /// withdrawable after the channel's delay; the receiver may still claim meanwhile.
    function initiateWithdraw(ChannelConfig calldata config, uint128 amount) external nonReentrant {
        _onlyPayer(config);
        if (amount == 0) revert ZeroAmount();
        bytes32 id = getChannelId(config);
        Channel storage c = channels[id];
        uint128 available = c.balance - c.totalClaimed;
        if (amount > available) revert WithdrawAboveAvailable(id, amount, available);
        pendingWithdrawals[id] = PendingWithdrawal(amount, uint40(block.timestamp));
        emit WithdrawInitiated(id, amount, block.timestamp + config.withdrawDelay);
    }

    /// @notice Step 2, after the delay: pays the payer the pending amount, capped by what is still unclaimed.
    function finalizeWithdraw(ChannelConfig calldata config) external nonReentrant {
        _onlyPayer(config);
        bytes32 id = getChannelId(config);
        PendingWithdrawal memory w = pendingWithdrawals[id];
        if (w.amount == 0) revert NoPendingWithdrawal(id);
        uint256 readyAt = uint256(w.initiatedAt) + config.withdrawDelay;
        if (block.timestamp < readyAt) revert WithdrawNotReady(id, readyAt);
        delete pendingWithdrawals[id];
        Channel storage c = channels[id];
        uint128 available = c.balance - c.totalClaimed;
        uint128 paid = w.amount < available ? w.amount : available;
        c.balance -= paid;
        if (paid != 0) IERC20(config.token).safeTransfer(config.payer, paid);
        emit Withdrawn(id, paid);
        if (paid != 0 && c.balance == c.totalClaimed) emit ChannelClosed(id, config);
    }

    function getChannelId(ChannelConfig calldata config) public view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(CHANNEL_CONFIG_TYPEHASH, config)));
    }

    function getVoucherDigest(bytes32 channelId, uint128 maxClaimableAmount) public view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(VOUCHER_TYPEHASH, channelId, maxClaimableAmount)));
    }

    function getRefundDigest(bytes32 channelId, uint256 nonce, uint128 amount) public view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(REFUND_TYPEHASH, channelId, nonce, amount)));
    }

    function getClaimBatchDigest(VoucherClaim[] calldata voucherClaims) external view returns (bytes32) {
        bytes32[] memory ids = new bytes32[](voucherClaims.length);
        for (uint256 i; i < ids.length; ++i) {
            ids[i] = getChannelId(voucherClaims[i].voucher.channel);
        }
        return _claimBatchDigest(voucherClaims, ids);
    }

    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    function _claim(VoucherClaim calldata vc, bytes32 id) private {
        ChannelConfig calldata cfg = vc.voucher.channel;
        uint128 ceiling = vc.voucher.maxClaimableAmount;
        _checkVoucher(cfg, id, ceiling, vc.signature);
        Channel storage c = channels[id];
        uint128 target = vc.totalClaimed;
        uint128 done = c.totalClaimed;
        if (target < done) revert ClaimBelowClaimed(id, target, done);
        if (target > ceiling) revert ClaimAboveVoucher(id, target, ceiling);
        if (target > c.balance) revert ClaimAboveBalance(id, target, c.balance);
        if (target == done) return;
        uint128 amount = target - done;
        c.totalClaimed = target;
        receivers[cfg.receiver][cfg.token].totalClaimed += amount;
        emit Claimed(id, cfg.receiver, target, amount);
    }

    /// @dev A voucher is signed by the committed payer authorizer (ECDSA only: verifiable with no chain
    /// read), or, when that is zero, by the payer itself (ERC-1271 wallets too).
    function _checkVoucher(ChannelConfig calldata cfg, bytes32 id, uint128 ceiling, bytes calldata signature)
        private
        view
    {
        bytes32 digest = getVoucherDigest(id, ceiling);
        bool ok;
        if (cfg.payerAuthorizer != address(0)) {
            (address signer, ECDSA.RecoverError err,) = ECDSA.tryRecover(digest, signature);
            ok = err == ECDSA.RecoverError.NoError && signer == cfg.payerAuthorizer;
        } else {
            ok = SignatureChecker.isValidSignatureNow(cfg.payer, digest, signature);
        }
        if (!ok) revert InvalidVoucherSignature(id);
    }

    /// @dev The nonce advances first, even when nothing is left to refund (it voids older signatures).
    function _refund(ChannelConfig calldata cfg, bytes32 id, uint128 amount) private {
        if (amount == 0) revert ZeroAmount();
        uint256 next = ++refundNonce[id];
        Channel storage c = channels[id];
        uint128 available = c.balance - c.totalClaimed;
        uint128 paid = amount < available ? amount : available;
        if (paid == 0) return;
        c.balance -= paid;
        PendingWithdrawal storage w = pendingWithdrawals[id];
        if (w.amount != 0) {
            if (paid >= w.amount) delete pendingWithdrawals[id];
            else w.amount -= paid;
        }
        IERC20(cfg.token).safeTransfer(cfg.payer, paid);
        emit Refunded(id, paid, next);
        if (c.balance == c.totalClaimed) emit ChannelClosed(id, cfg);
    }

    function _claimBatchDigest(VoucherClaim[] calldata voucherClaims, bytes32[] memory ids)
        private
        view
        returns (bytes32)
    {
        bytes32[] memory entries = new bytes32[](ids.length);
        for (uint256 i; i < ids.length; ++i) {
            entries[i] = keccak256(
                abi.encode(
                    CLAIM_ENTRY_TYPEHASH,
                    ids[i],
                    voucherClaims[i].voucher.maxClaimableAmount,
                    voucherClaims[i].totalClaimed
                )
            );
        }
        return _hashTypedDataV4(keccak256(abi.encode(CLAIM_BATCH_TYPEHASH, keccak256(abi.encodePacked(entries)))));
    }

    function _checkConfig(ChannelConfig calldata cfg) private pure {
        if (cfg.payer == address(0) || cfg.receiver == address(0) || cfg.receiverAuthorizer == address(0)) {
            revert ZeroAddress();
        }
        if (cfg.token == address(0)) revert ZeroAddress();
        if (cfg.withdrawDelay < MIN_WITHDRAW_DELAY || cfg.withdrawDelay > MAX_WITHDRAW_DELAY) {
            revert WithdrawDelayOutOfRange(cfg.withdrawDelay);
        }
    }

    function _onlyPayer(ChannelConfig calldata cfg) private view {
        if (msg.sender != cfg.payer && (cfg.payerAuthorizer == address(0) || msg.sender != cfg.payerAuthorizer)) {
            revert NotPayer(msg.sender);
        }
    }
}
