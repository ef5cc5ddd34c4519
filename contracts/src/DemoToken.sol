// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @title DemoToken
/// @notice A plain 18-decimal ERC-20 with an open faucet, for tests, `loranode dev` and the demo.
/// Never deploy it where the token has value: anyone can mint.
contract DemoToken is ERC20 {
    constructor() ERC20("loranode demo token", "LORA") {}

    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }
}
