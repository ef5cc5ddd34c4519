// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {DemoToken} from "../src/DemoToken.sol";

/// @title BlocklistToken
/// @notice DemoToken with a USDC-style blocklist: any transfer to or from a blocked address reverts.
/// Same storage as DemoToken plus `blocked`, so tests put its runtime code over a deployed DemoToken
/// (`anvil_setCode`) and keep every balance.
contract BlocklistToken is DemoToken {
    error Blocked(address account);

    mapping(address account => bool) public blocked;

    function setBlocked(address account, bool isBlocked) external {
        blocked[account] = isBlocked;
    }

    function _update(address from, address to, uint256 value) internal override {
        if (blocked[from]) revert Blocked(from);
        if (blocked[to]) revert Blocked(to);
        super._update(from, to, value);
    }
}
