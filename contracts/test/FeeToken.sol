// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {DemoToken} from "../src/DemoToken.sol";

/// @title FeeToken
/// @notice DemoToken with a USDT-style fee switch: once `feeBps` is set, every transfer delivers that much
/// less and burns the difference. Same storage as DemoToken plus `feeBps`, so tests put its runtime code
/// over a deployed DemoToken (`vm.etch`) and keep every balance.
contract FeeToken is DemoToken {
    uint256 public feeBps;

    function setFee(uint256 bps) external {
        feeBps = bps;
    }

    function _update(address from, address to, uint256 value) internal override {
        uint256 fee = from == address(0) || to == address(0) ? 0 : value * feeBps / 10_000;
        if (fee != 0) super._update(from, address(0), fee);
        super._update(from, to, value - fee);
    }
}
