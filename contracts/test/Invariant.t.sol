// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {DemoToken} from "../src/DemoToken.sol";
import {PaymentEscrow} from "../src/PaymentEscrow.sol";
import {Settlement} from "../src/Settlement.sol";
import {Fixture} from "./Fixture.sol";
import {TestBase} from "./TestBase.sol";

/// @notice Drives escrow and settlement with random deposits, thaws, withdrawals, settles (some with
/// trees whose leaves sum above the pot), claims, vetoes, the guardian's amends and time jumps, and keeps
/// ghost totals: the handler's own view of each node's pot, epochs and vetoes, and a count of every
/// outcome the contract must never allow.
contract Handler is TestBase {
    Settlement internal immutable s;
    PaymentEscrow internal immutable e;
    DemoToken internal immutable t;
    address internal immutable guardian;
    uint256[3] internal payerKeys = [uint256(0xA1), 0xA2, 0xA3];
    address[2] public nodes = [address(0x90DE1), address(0x90DE2)];
    address[2] public payees = [address(0xA11CE), address(0xB0B)];

    uint256 public deposited;
    uint256 public withdrawn;
    uint256 public collectedSum;
    uint256 public claimedSum;
    mapping(address node => mapping(uint64 epochId => uint256[2])) internal leaves;
    mapping(address node => mapping(address account => uint256)) public maxLeaf;
    mapping(address node => mapping(address account => uint256)) public claimedGhost;
    mapping(address payer => mapping(address node => mapping(uint32 lane => uint256))) public maxSigned;

    mapping(address node => uint256) public pot; // collected into the node's pot
    mapping(address node => uint64) public lastLive; // the node's latest epoch that was not forgotten
    mapping(address node => uint64) public maxEpoch; // the highest epoch id it ever settled
    mapping(address node => uint64) public vetoedFrom; // its first vetoed epoch, 0 when none
    mapping(address node => mapping(uint64 epochId => uint256)) internal epochTotal;
    mapping(address node => mapping(uint64 epochId => bool)) internal overPromises;
    // Outcomes that must stay 0.
    uint256 public claimsOnVoidEpochs; // paid against a vetoed or forgotten epoch
    uint256 public claimsAboveEpochTotal; // left the pot's paidOut above the claimed epoch's total
    uint256 public settlesWhileVetoed;
    uint256 public badAmends; // an amend went through with a total off the pot, or with no veto to answer
    uint256 public stuckAfterDrain; // wei left in a pot after every leaf of its honest latest epoch claimed

    constructor(Settlement s_, DemoToken t_, address guardian_) {
        (s, e, t, guardian) = (s_, s_.escrow(), t_, guardian_);
    }

    function payer(uint256 i) public view returns (address) {
        return vm.addr(payerKeys[i % 3]);
    }

    function deposit(uint256 p, uint256 n, uint256 amount) external {
        amount = bound(amount, 1, 1e24);
        address from = payer(p);
        t.mint(from, amount);
        vm.startPrank(from);
        t.approve(address(e), amount);
        e.deposit(nodes[n % 2], amount);
        vm.stopPrank();
        deposited += amount;
    }

    function thaw(uint256 p, uint256 n, uint256 amount) external {
        (uint256 balance,,) = e.accounts(payer(p), nodes[n % 2]);
        vm.prank(payer(p));
        e.thaw(nodes[n % 2], bound(amount, 0, balance));
    }

    function withdraw(uint256 p, uint256 n) external {
        (, uint256 thawing, uint64 endAt) = e.accounts(payer(p), nodes[n % 2]);
        if (thawing == 0 || block.timestamp < endAt) return;
        vm.prank(payer(p));
        withdrawn += e.withdraw(nodes[n % 2]);
    }

    function warp(uint256 dt) external {
        vm.warp(block.timestamp + bound(dt, 5 minutes, 3 hours));
    }

    function settle(uint256 p, uint256 n, uint256 lane, uint256 amount, uint256 extra, uint8 cheat) external {
        (p, n) = _funded(p, n);
        address node = nodes[n];
        address from = payer(p);
        (uint256 balance,,) = e.accounts(from, node);
        if (balance == 0) return;
        amount = bound(amount, 1, balance);
        uint32 ln = uint32(lane % 3);
        uint256 cumulative = s.collected(from, node, ln) + amount + bound(extra, 0, 1e18); // may sign more
        if (cumulative > maxSigned[from][node][ln]) maxSigned[from][node][ln] = cumulative;
        Settlement.SignedVoucher[] memory vs = _signed(p, node, ln, cumulative);
        uint256[] memory amounts = new uint256[](1);
        amounts[0] = amount;
        uint256 total = s.rewardsTotal(node) + amount;
        uint256 a = total * 3 / 10;
        uint256 b = cheat % 8 == 0 ? 2 * total : total - a; // 1 in 8: a tree promising more than the pot
        uint64 epochId = s.lastEpoch(node) + 1;
        vm.prank(node);
        try s.settle(epochId, vs, amounts, _root(a, b), total, bytes32(0), 1) {
            if (vetoedFrom[node] != 0) ++settlesWhileVetoed;
        } catch {
            return;
        }
        _record(node, epochId, a, b, total, b != total - a);
        collectedSum += amount;
        pot[node] = total;
    }

    /// @dev The first (payer, node) account from the fuzzed one on that has a balance to collect.
    function _funded(uint256 p, uint256 n) internal view returns (uint256, uint256) {
        for (uint256 k; k < 6; ++k) {
            uint256 i = ((p % 3) * 2 + n % 2 + k) % 6;
            (uint256 balance,,) = e.accounts(payer(i / 2), nodes[i % 2]);
            if (balance > 0) return (i / 2, i % 2);
        }
        return (p % 3, n % 2);
    }

    function _signed(uint256 p, address node, uint32 lane, uint256 cumulative)
        internal
        view
        returns (Settlement.SignedVoucher[] memory vs)
    {
        Settlement.Voucher memory v =
            Settlement.Voucher(payer(p), node, lane, cumulative, keccak256("req"), uint64(block.timestamp + 1 hours));
        (uint8 sv, bytes32 r, bytes32 ss) = vm.sign(payerKeys[p], s.voucherDigest(v));
        vs = new Settlement.SignedVoucher[](1);
        vs[0] = Settlement.SignedVoucher(v, abi.encodePacked(r, ss, sv));
    }

    function _record(address node, uint64 epochId, uint256 a, uint256 b, uint256 total, bool cheat) internal {
        leaves[node][epochId] = [a, b];
        (epochTotal[node][epochId], overPromises[node][epochId], lastLive[node]) = (total, cheat, epochId);
        if (epochId > maxEpoch[node]) maxEpoch[node] = epochId;
        if (a > maxLeaf[node][payees[0]]) maxLeaf[node][payees[0]] = a;
        if (b > maxLeaf[node][payees[1]]) maxLeaf[node][payees[1]] = b;
    }

    function claim(uint256 n, uint256 who, uint256 epochSel) external {
        address node = nodes[n % 2];
        uint64 last = s.lastEpoch(node);
        if (last == 0) return;
        // Mostly the latest epoch that can pay; one time in four any epoch ever settled: claimable or
        // not, vetoed, or forgotten by an amend.
        uint64 epochId = epochSel % 4 == 0 ? uint64(1 + (epochSel / 4) % maxEpoch[node]) : last;
        while (epochSel % 4 != 0 && epochId > 1 && !s.isClaimable(node, epochId)) --epochId;
        uint256[2] memory l = leaves[node][epochId];
        uint256 i = who % 2;
        bytes32[] memory proof = _proof(payees[1 - i], l[1 - i]);
        _claim(node, epochId, i, l[i], proof);
    }

    function _claim(address node, uint64 epochId, uint256 i, uint256 cumulative, bytes32[] memory proof) internal {
        try s.claim(node, epochId, payees[i], cumulative, proof) returns (uint256 paid) {
            claimedSum += paid;
            claimedGhost[node][payees[i]] += paid;
            uint64 first = vetoedFrom[node];
            if (epochId > lastLive[node] || (first != 0 && epochId >= first)) ++claimsOnVoidEpochs;
            if (s.paidOut(node) > epochTotal[node][epochId]) ++claimsAboveEpochTotal;
        } catch {}
    }

    /// @dev The guardian vetoes some epoch of the node (it only works while that epoch is locked).
    function veto(uint256 n, uint256 epochSel) external {
        address node = nodes[n % 2];
        uint64 last = s.lastEpoch(node);
        if (last == 0) return;
        uint64 epochId = last - uint64(epochSel % 3 % last); // the latest, or one of the two before
        vm.prank(guardian);
        try s.veto(node, epochId) {
            if (vetoedFrom[node] == 0 || epochId < vetoedFrom[node]) vetoedFrom[node] = epochId;
        } catch {}
    }

    /// @dev The guardian's corrected root over the whole pot (1 in 8 over-promising), on a vetoed node if
    /// there is one; 1 in 8 it first tries a total one wei above the pot, which must never go through.
    function amend(uint256 n, uint8 cheat) external {
        address node = vetoedFrom[nodes[n % 2]] != 0 ? nodes[n % 2] : nodes[1 - n % 2]; // a vetoed one if any
        uint256 total = pot[node];
        vm.startPrank(guardian);
        if (cheat % 8 == 1) {
            try s.amend(node, _root(total, 1), total + 1, bytes32(0), 0) {
                ++badAmends;
            } catch {}
        }
        uint256 a = total * 3 / 10;
        uint256 b = cheat % 8 == 0 ? 2 * total : total - a;
        try s.amend(node, _root(a, b), total, bytes32("amended"), 2) {
            if (vetoedFrom[node] == 0) ++badAmends;
            else _record(node, vetoedFrom[node], a, b, total, cheat % 8 == 0);
            vetoedFrom[node] = 0;
        } catch {}
        vm.stopPrank();
    }

    /// @dev Once the node's latest epoch is honest and claimable, both of its leaves are claimed:
    /// that must pay out every wei the pot collected (amended epochs included).
    function drain(uint256 n) external {
        address node = nodes[n % 2];
        uint64 epochId = lastLive[node];
        if (epochId == 0 || overPromises[node][epochId] || !s.isClaimable(node, epochId)) return;
        uint256[2] memory l = leaves[node][epochId];
        _claim(node, epochId, 0, l[0], _proof(payees[1], l[1]));
        _claim(node, epochId, 1, l[1], _proof(payees[0], l[0]));
        if (s.paidOut(node) < pot[node]) stuckAfterDrain += pot[node] - s.paidOut(node);
    }

    function _proof(address account, uint256 amount) internal pure returns (bytes32[] memory proof) {
        proof = new bytes32[](1);
        proof[0] = _leaf(account, amount);
    }

    function _leaf(address account, uint256 amount) internal pure returns (bytes32) {
        return keccak256(bytes.concat(keccak256(abi.encode(account, amount))));
    }

    function _root(uint256 a, uint256 b) internal view returns (bytes32) {
        (bytes32 x, bytes32 y) = (_leaf(payees[0], a), _leaf(payees[1], b));
        return x < y ? keccak256(abi.encode(x, y)) : keccak256(abi.encode(y, x));
    }
}

contract InvariantTest is Fixture {
    /// Another node's pot, settled before the run: what a tree promising too much would steal.
    uint256 internal constant BYSTANDER_POT = 1e27;
    Handler internal handler;

    function setUp() public override {
        super.setUp();
        handler = new Handler(settlement, token, guardian);
        _fund(payer, node, BYSTANDER_POT);
        _settleOne(1, BYSTANDER_POT, BYSTANDER_POT, bytes32("nobody"), BYSTANDER_POT);
    }

    function targetContracts() public view returns (address[] memory out) {
        out = new address[](1);
        out[0] = address(handler);
    }

    /// deposits = balances + collected + withdrawn, and the escrow holds exactly the balances.
    function invariant_escrow_conservation() public view {
        uint256 balances;
        for (uint256 p; p < 3; ++p) {
            for (uint256 n; n < 2; ++n) {
                (uint256 b, uint256 thawing,) = escrow.accounts(handler.payer(p), handler.nodes(n));
                assertLe(thawing, b, "thawing <= balance");
                balances += b;
            }
        }
        assertEq(handler.deposited(), balances + handler.collectedSum() + handler.withdrawn(), "conservation");
        assertEq(token.balanceOf(address(escrow)), balances, "escrow holds the balances");
    }

    /// No account ever claims more than the largest cumulative leaf it was given.
    function invariant_claims_within_leaves() public view {
        for (uint256 n; n < 2; ++n) {
            for (uint256 i; i < 2; ++i) {
                (address node, address account) = (handler.nodes(n), handler.payees(i));
                uint256 claimed = settlement.claimed(node, account);
                assertEq(claimed, handler.claimedGhost(node, account), "claimed = sum paid");
                assertLe(claimed, handler.maxLeaf(node, account), "claimed <= leaf");
            }
        }
    }

    /// Rewards paid never exceed what was collected, per node and in total, and the pot balances.
    function invariant_paid_within_collected() public view {
        for (uint256 n; n < 2; ++n) {
            address node = handler.nodes(n);
            assertLe(settlement.paidOut(node), settlement.rewardsTotal(node), "node pot");
        }
        assertLe(handler.claimedSum(), handler.collectedSum(), "paid <= collected");
        assertEq(token.balanceOf(address(settlement)), BYSTANDER_POT + handler.collectedSum() - handler.claimedSum(), "pots");
    }

    /// What a lane marks collected never exceeds the highest cumulative the payer signed on it.
    function invariant_lane_within_signed() public view {
        for (uint256 p; p < 3; ++p) {
            for (uint256 n; n < 2; ++n) {
                for (uint32 lane; lane < 3; ++lane) {
                    (address payer_, address node) = (handler.payer(p), handler.nodes(n));
                    assertLe(settlement.collected(payer_, node, lane), handler.maxSigned(payer_, node, lane), "lane");
                }
            }
        }
    }

    /// The contract always holds what every pot still owes: sum over nodes of rewardsTotal - paidOut.
    function invariant_balance_backs_every_pot() public view {
        uint256 owed = settlement.rewardsTotal(node) - settlement.paidOut(node);
        for (uint256 n; n < 2; ++n) {
            address nd = handler.nodes(n);
            assertEq(settlement.rewardsTotal(nd), handler.pot(nd), "rewardsTotal = collected");
            owed += settlement.rewardsTotal(nd) - settlement.paidOut(nd);
        }
        assertLe(owed, token.balanceOf(address(settlement)), "balance >= owed");
    }

    /// No claim leaves a node's paidOut above the rewardsTotal of the epoch it claimed against; and once
    /// a node's honest latest epoch (an amended one included) is claimable, its leaves pay out every
    /// collected wei.
    function invariant_claims_capped_per_epoch_and_nothing_stuck() public view {
        assertEq(handler.claimsAboveEpochTotal(), 0, "claims above the epoch's total");
        assertEq(handler.stuckAfterDrain(), 0, "wei stuck after the honest leaves were claimed");
    }

    /// Nothing is ever paid against a vetoed (or forgotten) epoch, a vetoed node never settles, and the
    /// guardian amends only a vetoed node, to its whole pot; the contract forgets what the amend forgot.
    function invariant_vetoed_epochs_never_pay() public view {
        assertEq(handler.claimsOnVoidEpochs(), 0, "claims on vetoed or forgotten epochs");
        assertEq(handler.settlesWhileVetoed(), 0, "settles on top of a veto");
        assertEq(handler.badAmends(), 0, "amends off the pot or without a veto");
        for (uint256 n; n < 2; ++n) {
            address nd = handler.nodes(n);
            (uint64 live, uint64 first) = (handler.lastLive(nd), handler.vetoedFrom(nd));
            assertEq(settlement.lastEpoch(nd), live, "forgotten epochs are gone");
            for (uint64 e = 1; e <= handler.maxEpoch(nd); ++e) {
                if (e > live || (first != 0 && e >= first)) assertTrue(!settlement.isClaimable(nd, e), "void");
            }
        }
    }
}
