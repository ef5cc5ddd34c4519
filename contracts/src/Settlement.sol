// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";
import {SignatureChecker} from "@openzeppelin/contracts/utils/cryptography/SignatureChecker.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";
import {PaymentEscrow} from "./PaymentEscrow.sol";

/// @title Settlement
/// @notice One rewards pot per node (its operator address). Each `settle` is an epoch: it collects
/// signed vouchers from escrow into the pot and records the node's cumulative rewards root, which
/// unlocks after `challengePeriod`. Payees claim `cumulativeAmount - claimed` against any unlocked
/// epoch, each claim capped by that epoch's `rewardsTotal`. A guardian may veto a locked epoch: it and
/// every later epoch of that node stay unclaimable and the node cannot settle again, until the guardian
/// amends: a corrected root over everything the pot collected replaces the first vetoed epoch.
contract Settlement is EIP712, ReentrancyGuardTransient {
    using SafeERC20 for IERC20;

    struct Voucher {
        address payer;
        address node;
        uint32 lane;
        uint256 cumulative;
        bytes32 requestHash;
        uint64 deadline;
    }

    struct SignedVoucher {
        Voucher voucher;
        bytes signature;
    }

    struct Epoch {
        bytes32 rewardsRoot;
        uint256 rewardsTotal;
        bytes32 receiptsRoot;
        uint64 receiptCount;
        uint64 unlockAt;
        bool vetoed;
    }

    struct Claim {
        address node;
        uint64 epochId;
        address account;
        uint256 cumulativeAmount;
        bytes32[] proof;
    }

    bytes32 public constant VOUCHER_TYPEHASH = keccak256(
        "Voucher(address payer,address node,uint32 lane,uint256 cumulative,bytes32 requestHash,uint64 deadline)"
    );
    uint16 public constant BPS = 10_000;

    error ZeroAddress();
    error BadFeeBps(uint16 protocolBps, uint16 nodeBps);
    error TokenMismatch(address token, address escrowToken);
    error NotGuardian(address caller);
    error NodeVetoed(address node, uint64 firstVetoedEpoch);
    error NodeNotVetoed(address node);
    error EpochOutOfOrder(address node, uint64 expected, uint64 epochId);
    error LengthMismatch(uint256 numVouchers, uint256 numAmounts);
    error VoucherNodeMismatch(uint256 index, address voucherNode);
    error VoucherExpired(uint256 index, uint64 deadline);
    error InvalidVoucherSignature(uint256 index, address payer);
    error ZeroCollect(uint256 index);
    error AmountExceedsVoucher(uint256 index, uint256 amount, uint256 uncollected);
    error CollectedShort(uint256 index, uint256 amount, uint256 received);
    error RewardsTotalMismatch(uint256 expected, uint256 rewardsTotal);
    error UnknownEpoch(address node, uint64 epochId);
    error EpochLocked(address node, uint64 epochId, uint64 unlockAt);
    error EpochNotLocked(address node, uint64 epochId);
    error EpochIsVetoed(address node, uint64 epochId);
    error InvalidProof(address node, uint64 epochId, address account, uint256 cumulativeAmount);
    error NothingToClaim(address node, address account, uint256 cumulativeAmount, uint256 claimed);
    error ExceedsEpochTotal(address node, uint64 epochId, uint256 paidOut, uint256 amount, uint256 rewardsTotal);

    event EpochSettled(
        address indexed node,
        uint64 indexed epochId,
        bytes32 rewardsRoot,
        uint256 rewardsTotal,
        bytes32 receiptsRoot,
        uint64 receiptCount,
        uint256 collected,
        uint64 unlockAt
    );
    event VoucherCollected(
        address indexed node, address indexed payer, uint32 indexed lane, uint256 cumulative, uint256 amount
    );
    event EpochVetoed(address indexed node, uint64 indexed epochId);
    /// @notice `epochId` (the node's first vetoed epoch) now holds the guardian's corrected roots;
    /// epochs `epochId + 1 ..= droppedThrough` are forgotten and the node settles again from `epochId + 1`.
    event EpochAmended(
        address indexed node,
        uint64 indexed epochId,
        bytes32 rewardsRoot,
        uint256 rewardsTotal,
        bytes32 receiptsRoot,
        uint64 receiptCount,
        uint64 unlockAt,
        uint64 droppedThrough
    );
    event Claimed(
        address indexed node, address indexed account, uint64 indexed epochId, uint256 amount, uint256 cumulativeAmount
    );

    IERC20 public immutable token;
    PaymentEscrow public immutable escrow;
    address public immutable treasury;
    address public immutable guardian;
    uint16 public immutable protocolBps;
    uint16 public immutable nodeBps;
    uint64 public immutable challengePeriod;

    mapping(address node => uint64) public lastEpoch;
    mapping(address node => mapping(uint64 epochId => Epoch)) public epochs;
    /// @notice Cumulative amount collected into `node`'s pot (the latest epoch's rewardsTotal).
    mapping(address node => uint256) public rewardsTotal;
    /// @notice Amount paid out of `node`'s pot so far; never above `rewardsTotal(node)`.
    mapping(address node => uint256) public paidOut;
    /// @notice The lowest vetoed epoch of a node, 0 when none.
    mapping(address node => uint64) public firstVetoedEpoch;
    mapping(address payer => mapping(address node => mapping(uint32 lane => uint256))) public collected;
    mapping(address node => mapping(address account => uint256)) public claimed;

    constructor(
        IERC20 token_,
        PaymentEscrow escrow_,
        address treasury_,
        uint16 protocolBps_,
        uint16 nodeBps_,
        address guardian_,
        uint64 challengePeriod_
    ) EIP712("loranode", "1") {
        if (treasury_ == address(0) || guardian_ == address(0)) revert ZeroAddress();
        if (uint256(protocolBps_) + nodeBps_ > BPS) revert BadFeeBps(protocolBps_, nodeBps_);
        if (address(escrow_.token()) != address(token_)) revert TokenMismatch(address(token_), address(escrow_.token()));
        token = token_;
        escrow = escrow_;
        treasury = treasury_;
        protocolBps = protocolBps_;
        nodeBps = nodeBps_;
        guardian = guardian_;
        challengePeriod = challengePeriod_;
    }

    /// @notice Closes epoch `epochId` of the caller's node: collects `amounts[i]` on `vouchers[i]` and
    /// records the node's new cumulative rewards root. `rewardsTotal_` must grow by exactly the sum.
    function settle(
        uint64 epochId,
        SignedVoucher[] calldata vouchers,
        uint256[] calldata amounts,
        bytes32 rewardsRoot,
        uint256 rewardsTotal_,
        bytes32 receiptsRoot,
        uint64 receiptCount
    ) external nonReentrant {
        address node = msg.sender;
        if (firstVetoedEpoch[node] != 0) revert NodeVetoed(node, firstVetoedEpoch[node]);
        uint64 expected = lastEpoch[node] + 1;
        if (epochId != expected) revert EpochOutOfOrder(node, expected, epochId);
        if (vouchers.length != amounts.length) revert LengthMismatch(vouchers.length, amounts.length);
        uint256 sum;
        for (uint256 i; i < vouchers.length; ++i) {
            sum += _collect(i, node, vouchers[i], amounts[i]);
        }
        _close(node, epochId, Epoch(rewardsRoot, rewardsTotal_, receiptsRoot, receiptCount, 0, false), sum);
    }

    /// @notice Pays `account` its `cumulativeAmount` in `node`'s tree at `epochId`, less what it
    /// already claimed. Anyone may call it for anyone.
    function claim(address node, uint64 epochId, address account, uint256 cumulativeAmount, bytes32[] calldata proof)
        external
        nonReentrant
        returns (uint256 amount)
    {
        uint256 cap;
        (amount, cap) = _due(node, epochId, account, cumulativeAmount, proof);
        if (amount == 0) revert NothingToClaim(node, account, cumulativeAmount, claimed[node][account]);
        _pay(node, epochId, account, cumulativeAmount, amount, cap);
    }

    /// @notice Claims in bulk (for relayers). Entries with nothing due are skipped; a bad proof reverts.
    function claimMany(Claim[] calldata claims) external nonReentrant returns (uint256 total) {
        for (uint256 i; i < claims.length; ++i) {
            Claim calldata c = claims[i];
            (uint256 amount, uint256 cap) = _due(c.node, c.epochId, c.account, c.cumulativeAmount, c.proof);
            if (amount == 0) continue;
            _pay(c.node, c.epochId, c.account, c.cumulativeAmount, amount, cap);
            total += amount;
        }
    }

    /// @notice The guardian vetoes a still-locked epoch: it and all later epochs of `node` are void, and
    /// the node cannot settle, until the guardian `amend`s.
    function veto(address node, uint64 epochId) external {
        if (msg.sender != guardian) revert NotGuardian(msg.sender);
        Epoch storage e = _epoch(node, epochId);
        if (block.timestamp >= e.unlockAt) revert EpochNotLocked(node, epochId);
        uint64 first = firstVetoedEpoch[node];
        if (first != 0 && first <= epochId) revert EpochIsVetoed(node, epochId);
        e.vetoed = true;
        firstVetoedEpoch[node] = epochId;
        emit EpochVetoed(node, epochId);
    }

    /// @notice The guardian's answer to a veto (the governance act that lets a vetoed node go on). The
    /// node's first vetoed epoch is replaced by a corrected epoch whose `rewardsTotal_` must be all the pot
    /// ever collected (`rewardsTotal(node)`), so its leaves can pay out the vetoed epochs' funds and never
    /// more. It is locked for a fresh `challengePeriod` (and may be vetoed again in that time). Every
    /// later epoch is forgotten (unknown: never claimable; the public `epochs` getter may still show its
    /// old values until the node settles that id again), the veto is cleared and the node settles again
    /// from `epochId + 1`. `claimed` is kept: leaves are cumulative, so a leaf pays only what its account
    /// was not paid yet, and a claim already paid is never paid twice.
    function amend(address node, bytes32 rewardsRoot, uint256 rewardsTotal_, bytes32 receiptsRoot, uint64 receiptCount)
        external
    {
        if (msg.sender != guardian) revert NotGuardian(msg.sender);
        uint64 epochId = firstVetoedEpoch[node];
        if (epochId == 0) revert NodeNotVetoed(node);
        if (rewardsTotal_ != rewardsTotal[node]) revert RewardsTotalMismatch(rewardsTotal[node], rewardsTotal_);
        uint64 unlockAt = uint64(block.timestamp) + challengePeriod;
        uint64 dropped = lastEpoch[node];
        epochs[node][epochId] = Epoch(rewardsRoot, rewardsTotal_, receiptsRoot, receiptCount, unlockAt, false);
        lastEpoch[node] = epochId;
        firstVetoedEpoch[node] = 0;
        emit EpochAmended(node, epochId, rewardsRoot, rewardsTotal_, receiptsRoot, receiptCount, unlockAt, dropped);
    }

    /// @notice True when `epochId` of `node` can be claimed against now.
    function isClaimable(address node, uint64 epochId) external view returns (bool) {
        if (epochId == 0 || epochId > lastEpoch[node]) return false;
        uint64 first = firstVetoedEpoch[node];
        return block.timestamp >= epochs[node][epochId].unlockAt && (first == 0 || epochId < first);
    }

    /// @notice The EIP-712 digest a payer signs for `v`.
    function voucherDigest(Voucher calldata v) public view returns (bytes32) {
        return _hashTypedDataV4(
            keccak256(abi.encode(VOUCHER_TYPEHASH, v.payer, v.node, v.lane, v.cumulative, v.requestHash, v.deadline))
        );
    }

    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    function _collect(uint256 i, address node, SignedVoucher calldata sv, uint256 amount)
        private
        returns (uint256)
    {
        Voucher calldata v = sv.voucher;
        if (v.node != node) revert VoucherNodeMismatch(i, v.node);
        if (block.timestamp > v.deadline) revert VoucherExpired(i, v.deadline);
        if (!_signedByPayer(v, sv.signature)) revert InvalidVoucherSignature(i, v.payer);
        if (amount == 0) revert ZeroCollect(i);
        uint256 done = collected[v.payer][node][v.lane];
        uint256 uncollected = v.cumulative > done ? v.cumulative - done : 0;
        if (amount > uncollected) revert AmountExceedsVoucher(i, amount, uncollected);
        collected[v.payer][node][v.lane] = done + amount;
        uint256 before = token.balanceOf(address(this));
        escrow.collect(v.payer, node, amount);
        // a token taking a fee on transfers would leave the pot short of what it now promises
        uint256 received = token.balanceOf(address(this)) - before;
        if (received != amount) revert CollectedShort(i, amount, received);
        emit VoucherCollected(node, v.payer, v.lane, v.cumulative, amount);
        return amount;
    }

    /// @dev ECDSA first, so an EOA payer's voucher never depends on code at its address (an EIP-7702
    /// delegation cannot turn a voucher that simulated fine into a revert); then ERC-1271 for a contract
    /// payer: a node's X402Router, whose signature is its node's (docs/x402.md).
    function _signedByPayer(Voucher calldata v, bytes calldata signature) private view returns (bool) {
        bytes32 digest = voucherDigest(v);
        (address signer, ECDSA.RecoverError err,) = ECDSA.tryRecover(digest, signature);
        if (err == ECDSA.RecoverError.NoError && signer == v.payer) return true;
        return v.payer.code.length != 0 && SignatureChecker.isValidERC1271SignatureNow(v.payer, digest, signature);
    }

    function _close(address node, uint64 epochId, Epoch memory e, uint256 sum) private {
        uint256 previous = rewardsTotal[node];
        if (e.rewardsTotal != previous + sum) revert RewardsTotalMismatch(previous + sum, e.rewardsTotal);
        e.unlockAt = uint64(block.timestamp) + challengePeriod;
        epochs[node][epochId] = e;
        lastEpoch[node] = epochId;
        rewardsTotal[node] = e.rewardsTotal;
        emit EpochSettled(
            node, epochId, e.rewardsRoot, e.rewardsTotal, e.receiptsRoot, e.receiptCount, sum, e.unlockAt
        );
    }

    /// @dev What `account` is due against `epochId` (0 when nothing), and that epoch's rewardsTotal: the
    /// most the node's pot may have paid out once this claim is paid.
    function _due(address node, uint64 epochId, address account, uint256 cumulativeAmount, bytes32[] calldata proof)
        private
        view
        returns (uint256 amount, uint256 cap)
    {
        Epoch storage e = _epoch(node, epochId);
        if (block.timestamp < e.unlockAt) revert EpochLocked(node, epochId, e.unlockAt);
        uint64 first = firstVetoedEpoch[node];
        if (first != 0 && epochId >= first) revert EpochIsVetoed(node, epochId);
        bytes32 leaf = keccak256(bytes.concat(keccak256(abi.encode(account, cumulativeAmount))));
        if (!MerkleProof.verifyCalldata(proof, e.rewardsRoot, leaf)) {
            revert InvalidProof(node, epochId, account, cumulativeAmount);
        }
        uint256 done = claimed[node][account];
        return (cumulativeAmount > done ? cumulativeAmount - done : 0, e.rewardsTotal);
    }

    /// @dev Pays `amount` out of `node`'s pot, never above `cap`, the rewardsTotal of the epoch claimed
    /// against: a root that over-promises can never spend what later (maybe vetoed) epochs collected.
    function _pay(address node, uint64 epochId, address account, uint256 cumulativeAmount, uint256 amount, uint256 cap)
        private
    {
        uint256 paid = paidOut[node];
        if (paid + amount > cap) revert ExceedsEpochTotal(node, epochId, paid, amount, cap);
        paidOut[node] = paid + amount;
        claimed[node][account] = cumulativeAmount;
        token.safeTransfer(account, amount);
        emit Claimed(node, account, epochId, amount, cumulativeAmount);
    }

    function _epoch(address node, uint64 epochId) private view returns (Epoch storage) {
        if (epochId == 0 || epochId > lastEpoch[node]) revert UnknownEpoch(node, epochId);
        return epochs[node][epochId];
    }
}
