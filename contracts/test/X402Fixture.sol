// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {DemoToken3009} from "../src/DemoToken3009.sol";
import {ERC3009Collector} from "../src/ERC3009Collector.sol";
import {X402Channels} from "../src/X402Channels.sol";
import {TestBase} from "./TestBase.sol";

/// @notice The x402 channel contract and its ERC-3009 collector at the canonical addresses the SDKs
/// expect (copied there with `etch`, as `anvil_setCode` does on a dev chain), and signing helpers.
abstract contract X402Fixture is TestBase {
    address internal constant CANONICAL_CHANNELS = 0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003;
    address internal constant CANONICAL_COLLECTOR = 0x4020806089470a89826cB9fB1f4059150b550004;
    uint40 internal constant DELAY = 1 days;
    uint256 internal constant X_PAYER_KEY = 0xC0FFEE;
    uint256 internal constant AUTHORIZER_KEY = 0xA7;

    DemoToken3009 internal usd;
    X402Channels internal channels;
    ERC3009Collector internal collector;
    address internal xpayer;
    address internal authorizer;
    address internal receiver = address(0x5EC3);
    uint256 private depositSalt;

    function _deployChannels() internal {
        usd = new DemoToken3009();
        vm.etch(CANONICAL_CHANNELS, address(new X402Channels()).code);
        vm.etch(CANONICAL_COLLECTOR, address(new ERC3009Collector(CANONICAL_CHANNELS)).code);
        channels = X402Channels(CANONICAL_CHANNELS);
        collector = ERC3009Collector(CANONICAL_COLLECTOR);
        xpayer = vm.addr(X_PAYER_KEY);
        authorizer = vm.addr(AUTHORIZER_KEY);
    }

    function _config(address to, bytes32 salt) internal view returns (X402Channels.ChannelConfig memory) {
        return X402Channels.ChannelConfig(xpayer, xpayer, to, authorizer, address(usd), DELAY, salt);
    }

    function _cfg() internal view returns (X402Channels.ChannelConfig memory) {
        return _config(receiver, bytes32(0));
    }

    /// @dev The ERC-3009 collector data for `amount` into `cfg`'s channel, signed by `key`.
    function _authorization(uint256 key, X402Channels.ChannelConfig memory cfg, uint256 amount, uint256 salt)
        internal
        view
        returns (bytes memory)
    {
        bytes32 nonce = keccak256(abi.encode(channels.getChannelId(cfg), salt));
        uint256 validBefore = block.timestamp + 1 hours;
        bytes32 structHash = keccak256(
            abi.encode(usd.RECEIVE_WITH_AUTHORIZATION_TYPEHASH(), cfg.payer, address(collector), amount, 0, validBefore, nonce)
        );
        bytes32 digest = keccak256(abi.encodePacked("\x19\x01", usd.DOMAIN_SEPARATOR(), structHash));
        return abi.encode(uint256(0), validBefore, salt, _sig(key, digest));
    }

    function _deposit(X402Channels.ChannelConfig memory cfg, uint128 amount) internal {
        usd.mint(cfg.payer, amount);
        channels.deposit(cfg, amount, address(collector), _authorization(X_PAYER_KEY, cfg, amount, ++depositSalt));
    }

    function _sig(uint256 key, bytes32 digest) internal pure returns (bytes memory) {
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(key, digest);
        return abi.encodePacked(r, s, v);
    }

    function _claimRow(X402Channels.ChannelConfig memory cfg, uint128 ceiling, uint128 total, uint256 key)
        internal
        view
        returns (X402Channels.VoucherClaim memory)
    {
        bytes memory sig = _sig(key, channels.getVoucherDigest(channels.getChannelId(cfg), ceiling));
        return X402Channels.VoucherClaim(X402Channels.Voucher(cfg, ceiling), sig, total);
    }

    function _rows(X402Channels.VoucherClaim memory row) internal pure returns (X402Channels.VoucherClaim[] memory out) {
        out = new X402Channels.VoucherClaim[](1);
        out[0] = row;
    }

    function _channel(X402Channels.ChannelConfig memory cfg) internal view returns (uint128 balance, uint128 claimed) {
        return channels.channels(channels.getChannelId(cfg));
    }
}
