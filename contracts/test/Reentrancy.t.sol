// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";
import {PaymentEscrow} from "../src/PaymentEscrow.sol";
import {Settlement} from "../src/Settlement.sol";
import {Fixture} from "./Fixture.sol";

/// @notice A token that calls back into Settlement from inside a transfer.
contract ReentrantToken is ERC20 {
    Settlement public target;
    bytes public callData;

    constructor() ERC20("reentrant", "RE") {}

    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }

    function arm(Settlement target_, bytes calldata data) external {
        (target, callData) = (target_, data);
    }

    function _update(address from, address to, uint256 value) internal override {
        super._update(from, to, value);
        if (address(target) != address(0) && from == address(target)) {
            Settlement t = target;
            target = Settlement(address(0));
            (bool ok, bytes memory err) = address(t).call(callData);
            if (!ok) {
                assembly {
                    revert(add(err, 32), mload(err))
                }
            }
        }
    }
}

contract ReentrancyTest is Fixture {
    function test_revert_claim_reentered_from_the_token() public {
        ReentrantToken evil = new ReentrantToken();
        address predicted = vm.computeCreateAddress(address(this), vm.getNonce(address(this)) + 1);
        PaymentEscrow e = new PaymentEscrow(evil, THAW, predicted);
        Settlement s = new Settlement(evil, e, treasury, 0, 0, guardian, CHALLENGE);
        evil.mint(payer, 100);
        vm.startPrank(payer);
        evil.approve(address(e), 100);
        e.deposit(node, 100);
        vm.stopPrank();
        Settlement.Voucher memory v = _voucher(payer, 0, 100);
        (uint8 sv, bytes32 r, bytes32 ss) = vm.sign(PAYER_KEY, s.voucherDigest(v));
        Settlement.SignedVoucher memory signed = Settlement.SignedVoucher(v, abi.encodePacked(r, ss, sv));
        address alice = address(0xA11);
        bytes32 lb = _leaf(address(0xB0), 50);
        vm.prank(node);
        s.settle(1, _one(signed), _amounts(100), _pairRoot(_leaf(alice, 50), lb), 100, 0, 0);
        vm.warp(block.timestamp + CHALLENGE);
        bytes memory again = abi.encodeCall(Settlement.claim, (node, 1, address(0xB0), 50, _proof1(_leaf(alice, 50))));
        evil.arm(s, again);
        vm.expectRevert(ReentrancyGuardTransient.ReentrancyGuardReentrantCall.selector);
        s.claim(node, 1, alice, 50, _proof1(lb));
    }
}
