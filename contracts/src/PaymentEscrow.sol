// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";

/// @title PaymentEscrow
/// @notice A payer's balance for one node, in one ERC-20. The payer deposits, and to leave starts a
/// thaw of an amount; after `thawPeriod` seconds it may withdraw that amount. Until then the node
/// can still collect the whole balance (thawing part included), so a payer cannot pull funds out from
/// under vouchers it signed. Only the Settlement contract collects, and it is fixed at deployment.
contract PaymentEscrow is ReentrancyGuardTransient {
    using SafeERC20 for IERC20;

    struct Account {
        uint256 balance;
        uint256 thawing;
        uint64 thawEndAt;
    }

    error ZeroAmount();
    error ZeroAddress();
    error ThawExceedsBalance(uint256 amount, uint256 balance);
    error NothingThawing();
    error StillThawing(uint64 thawEndAt);
    error NotSettlement(address caller);
    error InsufficientBalance(address payer, address node, uint256 balance, uint256 amount);

    event Deposited(address indexed payer, address indexed node, uint256 amount);
    event ThawStarted(address indexed payer, address indexed node, uint256 amount, uint64 thawEndAt);
    event Withdrawn(address indexed payer, address indexed node, uint256 amount);
    event Collected(address indexed payer, address indexed node, uint256 amount);

    IERC20 public immutable token;
    uint64 public immutable thawPeriod;
    /// @notice The only address that may collect (the Settlement contract, deployed right after).
    address public immutable settlement;

    mapping(address payer => mapping(address node => Account)) public accounts;

    constructor(IERC20 token_, uint64 thawPeriod_, address settlement_) {
        if (address(token_) == address(0) || settlement_ == address(0)) revert ZeroAddress();
        token = token_;
        thawPeriod = thawPeriod_;
        settlement = settlement_;
    }

    /// @notice Pulls `amount` from the caller and adds what arrived to its balance for `node` (less than
    /// `amount` with a token that takes a fee on transfers: the escrow never credits more than it holds).
    function deposit(address node, uint256 amount) external nonReentrant {
        if (amount == 0) revert ZeroAmount();
        if (node == address(0)) revert ZeroAddress();
        uint256 before = token.balanceOf(address(this));
        token.safeTransferFrom(msg.sender, address(this), amount);
        uint256 received = token.balanceOf(address(this)) - before;
        if (received == 0) revert ZeroAmount();
        accounts[msg.sender][node].balance += received;
        emit Deposited(msg.sender, node, received);
    }

    /// @notice Sets the amount to withdraw and restarts the timer; `amount == 0` cancels the thaw.
    function thaw(address node, uint256 amount) external {
        Account storage a = accounts[msg.sender][node];
        if (amount > a.balance) revert ThawExceedsBalance(amount, a.balance);
        uint64 endAt = amount == 0 ? 0 : uint64(block.timestamp) + thawPeriod;
        a.thawing = amount;
        a.thawEndAt = endAt;
        emit ThawStarted(msg.sender, node, amount, endAt);
    }

    /// @notice Pays the thawing amount back to the payer once the thawing period is over.
    function withdraw(address node) external nonReentrant returns (uint256 amount) {
        Account storage a = accounts[msg.sender][node];
        amount = a.thawing;
        if (amount == 0) revert NothingThawing();
        if (block.timestamp < a.thawEndAt) revert StillThawing(a.thawEndAt);
        a.balance -= amount;
        a.thawing = 0;
        a.thawEndAt = 0;
        token.safeTransfer(msg.sender, amount);
        emit Withdrawn(msg.sender, node, amount);
    }

    /// @notice Moves `amount` of `payer`'s balance for `node` to the Settlement contract. If what is
    /// left is below the thawing amount, the thawing amount drops to it.
    function collect(address payer, address node, uint256 amount) external nonReentrant {
        if (msg.sender != settlement) revert NotSettlement(msg.sender);
        Account storage a = accounts[payer][node];
        uint256 balance = a.balance;
        if (amount > balance) revert InsufficientBalance(payer, node, balance, amount);
        unchecked {
            balance -= amount;
        }
        a.balance = balance;
        if (a.thawing > balance) a.thawing = balance;
        token.safeTransfer(msg.sender, amount);
        emit Collected(payer, node, amount);
    }

    /// @notice What the node may still count on: the balance less what is thawing.
    function available(address payer, address node) external view returns (uint256) {
        Account storage a = accounts[payer][node];
        return a.balance - a.thawing;
    }
}
