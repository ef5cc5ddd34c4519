// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {SignatureChecker} from "@openzeppelin/contracts/utils/cryptography/SignatureChecker.sol";

/// @title DemoToken3009
/// @notice The demo token with ERC-3009 `receiveWithAuthorization`, standing in for USDC where x402
/// clients deposit into payment channels (docs/x402.md). EIP-712 domain: name "loranode demo token",
/// version "1". Never deploy it where the token has value: anyone can mint.
contract DemoToken3009 is ERC20, EIP712 {
    bytes32 public constant RECEIVE_WITH_AUTHORIZATION_TYPEHASH = keccak256(
        "ReceiveWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
    );

    error CallerNotPayee(address caller, address to);
    error AuthorizationNotYetValid(uint256 validAfter);
    error AuthorizationExpired(uint256 validBefore);
    error AuthorizationUsed(address authorizer, bytes32 nonce);
    error InvalidAuthorizationSignature(address from);

    event AuthorizationUsedEvent(address indexed authorizer, bytes32 indexed nonce);

    mapping(address authorizer => mapping(bytes32 nonce => bool)) public authorizationState;

    constructor() ERC20("loranode demo token", "LORA") EIP712("loranode demo token", "1") {}

    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }

    /// @notice Moves `value` from `from` to the caller, who must be `to`, on `from`'s EIP-712 signature
    /// (EOA or ERC-1271). Each (from, nonce) works once, within (validAfter, validBefore).
    function receiveWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes calldata signature
    ) external {
        if (msg.sender != to) revert CallerNotPayee(msg.sender, to);
        if (block.timestamp <= validAfter) revert AuthorizationNotYetValid(validAfter);
        if (block.timestamp >= validBefore) revert AuthorizationExpired(validBefore);
        if (authorizationState[from][nonce]) revert AuthorizationUsed(from, nonce);
        bytes32 digest = _hashTypedDataV4(
            keccak256(abi.encode(RECEIVE_WITH_AUTHORIZATION_TYPEHASH, from, to, value, validAfter, validBefore, nonce))
        );
        if (!SignatureChecker.isValidSignatureNow(from, digest, signature)) revert InvalidAuthorizationSignature(from);
        authorizationState[from][nonce] = true;
        emit AuthorizationUsedEvent(from, nonce);
        _transfer(from, to, value);
    }

    function DOMAIN_SEPARATOR() external view returns (bytes32) {
        return _domainSeparatorV4();
    }
}
