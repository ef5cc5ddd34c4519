"""initial schema

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-28 11:00:47.031392
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import node.db.types


revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('adapters',
    sa.Column('adapter_id', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('owner', node.db.types.Address(length=42), nullable=False),
    sa.Column('base_model', node.db.types.Hash32(length=66), nullable=False),
    sa.Column('weights_sha256', node.db.types.Hash32(length=66), nullable=False),
    sa.Column('uri', sa.Text(), nullable=False),
    sa.Column('owner_share_bps', sa.Integer(), nullable=False),
    sa.Column('lineage_hash', node.db.types.Hash32(length=66), nullable=False),
    sa.Column('deprecated_block', sa.BigInteger(), nullable=True),
    sa.Column('tx_hash', node.db.types.Hash32(length=66), nullable=False),
    sa.Column('block_number', sa.BigInteger(), nullable=False),
    sa.Column('updated_block', sa.BigInteger(), nullable=False),
    sa.Column('is_final', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('adapter_id', name=op.f('pk_adapters'))
    )
    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_adapters_is_final_updated_block'), ['is_final', 'updated_block'], unique=False)

    op.create_table('chain_blocks',
    sa.Column('chain_id', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('number', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('hash', node.db.types.Hash32(length=66), nullable=False),
    sa.Column('parent_hash', node.db.types.Hash32(length=66), nullable=False),
    sa.PrimaryKeyConstraint('chain_id', 'number', name=op.f('pk_chain_blocks'))
    )
    op.create_table('claims',
    sa.Column('node', node.db.types.Address(length=42), nullable=False),
    sa.Column('account', node.db.types.Address(length=42), nullable=False),
    sa.Column('epoch_id', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('amount', node.db.types.Amount(precision=78, scale=0), nullable=False),
    sa.Column('cumulative_amount', node.db.types.Amount(precision=78, scale=0), nullable=False),
    sa.Column('tx_hash', node.db.types.Hash32(length=66), nullable=False),
    sa.Column('block_number', sa.BigInteger(), nullable=False),
    sa.Column('updated_block', sa.BigInteger(), nullable=False),
    sa.Column('is_final', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('node', 'account', 'epoch_id', name=op.f('pk_claims'))
    )
    with op.batch_alter_table('claims', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_claims_is_final_updated_block'), ['is_final', 'updated_block'], unique=False)

    op.create_table('datasets',
    sa.Column('dataset_id', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('owner', node.db.types.Address(length=42), nullable=False),
    sa.Column('content_hash', node.db.types.Hash32(length=66), nullable=False),
    sa.Column('uri', sa.Text(), nullable=False),
    sa.Column('payout', node.db.types.Address(length=42), nullable=False),
    sa.Column('tx_hash', node.db.types.Hash32(length=66), nullable=False),
    sa.Column('block_number', sa.BigInteger(), nullable=False),
    sa.Column('updated_block', sa.BigInteger(), nullable=False),
    sa.Column('is_final', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('dataset_id', name=op.f('pk_datasets'))
    )
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_datasets_is_final_updated_block'), ['is_final', 'updated_block'], unique=False)

    op.create_table('escrow_accounts',
    sa.Column('payer', node.db.types.Address(length=42), nullable=False),
    sa.Column('node', node.db.types.Address(length=42), nullable=False),
    sa.Column('balance', node.db.types.Amount(precision=78, scale=0), nullable=False),
    sa.Column('thawing', node.db.types.Amount(precision=78, scale=0), nullable=False),
    sa.Column('thaw_end_at', node.db.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('deposited', node.db.types.Amount(precision=78, scale=0), nullable=False),
    sa.Column('withdrawn', node.db.types.Amount(precision=78, scale=0), nullable=False),
    sa.Column('collected', node.db.types.Amount(precision=78, scale=0), nullable=False),
    sa.Column('block_number', sa.BigInteger(), nullable=False),
    sa.Column('updated_block', sa.BigInteger(), nullable=False),
    sa.Column('is_final', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('payer', 'node', name=op.f('pk_escrow_accounts'))
    )
    with op.batch_alter_table('escrow_accounts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_escrow_accounts_is_final_updated_block'), ['is_final', 'updated_block'], unique=False)

    op.create_table('indexer_cursor',
    sa.Column('chain_id', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('last_block', sa.BigInteger(), nullable=False),
    sa.Column('last_block_hash', node.db.types.Hash32(length=66), nullable=True),
    sa.Column('final_block', sa.BigInteger(), nullable=False),
    sa.Column('contracts', sa.Text(), nullable=False),
    sa.Column('updated_at', node.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('chain_id', name=op.f('pk_indexer_cursor'))
    )
    op.create_table('lane_collections',
    sa.Column('payer', node.db.types.Address(length=42), nullable=False),
    sa.Column('node', node.db.types.Address(length=42), nullable=False),
    sa.Column('lane', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('collected', node.db.types.Amount(precision=78, scale=0), nullable=False),
    sa.Column('last_cumulative', node.db.types.Amount(precision=78, scale=0), nullable=False),
    sa.Column('block_number', sa.BigInteger(), nullable=False),
    sa.Column('updated_block', sa.BigInteger(), nullable=False),
    sa.Column('is_final', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('payer', 'node', 'lane', name=op.f('pk_lane_collections'))
    )
    with op.batch_alter_table('lane_collections', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_lane_collections_is_final_updated_block'), ['is_final', 'updated_block'], unique=False)

    op.create_table('lanes',
    sa.Column('payer', node.db.types.Address(length=42), nullable=False),
    sa.Column('node', node.db.types.Address(length=42), nullable=False),
    sa.Column('lane', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('charged_total', node.db.types.Amount(precision=78, scale=0), nullable=False),
    sa.Column('last_cumulative', node.db.types.Amount(precision=78, scale=0), nullable=False),
    sa.Column('last_voucher_hash', node.db.types.Hash32(length=66), nullable=True),
    sa.Column('updated_at', node.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('payer', 'node', 'lane', name=op.f('pk_lanes'))
    )
    op.create_table('nodes',
    sa.Column('address', node.db.types.Address(length=42), nullable=False),
    sa.Column('is_self', sa.Boolean(), nullable=False),
    sa.Column('created_at', node.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('address', name=op.f('pk_nodes'))
    )
    op.create_table('raw_events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('chain_id', sa.BigInteger(), nullable=False),
    sa.Column('block_number', sa.BigInteger(), nullable=False),
    sa.Column('block_hash', node.db.types.Hash32(length=66), nullable=False),
    sa.Column('tx_hash', node.db.types.Hash32(length=66), nullable=False),
    sa.Column('log_index', sa.Integer(), nullable=False),
    sa.Column('address', node.db.types.Address(length=42), nullable=False),
    sa.Column('event', sa.String(length=32), nullable=False),
    sa.Column('entity', sa.String(length=200), nullable=False),
    sa.Column('args', sa.JSON(), nullable=False),
    sa.Column('is_final', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_raw_events')),
    sa.UniqueConstraint('chain_id', 'tx_hash', 'log_index', name=op.f('uq_raw_events_chain_id_tx_hash_log_index'))
    )
    with op.batch_alter_table('raw_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_raw_events_block_number'), ['block_number'], unique=False)
        batch_op.create_index(batch_op.f('ix_raw_events_entity_block_number_log_index'), ['entity', 'block_number', 'log_index'], unique=False)
        batch_op.create_index(batch_op.f('ix_raw_events_is_final_block_number'), ['is_final', 'block_number'], unique=False)

    op.create_table('settled_epochs',
    sa.Column('node', node.db.types.Address(length=42), nullable=False),
    sa.Column('epoch_id', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('rewards_root', node.db.types.Hash32(length=66), nullable=False),
    sa.Column('rewards_total', node.db.types.Amount(precision=78, scale=0), nullable=False),
    sa.Column('receipts_root', node.db.types.Hash32(length=66), nullable=False),
    sa.Column('receipt_count', sa.BigInteger(), nullable=False),
    sa.Column('collected', node.db.types.Amount(precision=78, scale=0), nullable=False),
    sa.Column('unlock_at', node.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('tx_hash', node.db.types.Hash32(length=66), nullable=False),
    sa.Column('vetoed_block', sa.BigInteger(), nullable=True),
    sa.Column('block_number', sa.BigInteger(), nullable=False),
    sa.Column('updated_block', sa.BigInteger(), nullable=False),
    sa.Column('is_final', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('node', 'epoch_id', name=op.f('pk_settled_epochs'))
    )
    with op.batch_alter_table('settled_epochs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_settled_epochs_is_final_updated_block'), ['is_final', 'updated_block'], unique=False)

    op.create_table('settlement_epochs',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('node', node.db.types.Address(length=42), nullable=False),
    sa.Column('epoch_id', sa.BigInteger(), nullable=False),
    sa.Column('state', sa.Enum('open', 'built', 'submitted', 'confirmed', 'final', 'failed', name='epochstate', native_enum=False, length=16), nullable=False),
    sa.Column('rewards_root', node.db.types.Hash32(length=66), nullable=True),
    sa.Column('rewards_total', node.db.types.Amount(precision=78, scale=0), nullable=True),
    sa.Column('receipts_root', node.db.types.Hash32(length=66), nullable=True),
    sa.Column('receipt_count', sa.BigInteger(), nullable=True),
    sa.Column('collected_total', node.db.types.Amount(precision=78, scale=0), nullable=True),
    sa.Column('trees', sa.JSON(), nullable=True),
    sa.Column('tx_hash', node.db.types.Hash32(length=66), nullable=True),
    sa.Column('nonce', sa.BigInteger(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('opened_at', node.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('built_at', node.db.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('submitted_at', node.db.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('confirmed_at', node.db.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('finalized_at', node.db.types.UTCDateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_settlement_epochs')),
    sa.UniqueConstraint('node', 'epoch_id', name=op.f('uq_settlement_epochs_node_epoch_id'))
    )
    with op.batch_alter_table('settlement_epochs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_settlement_epochs_state'), ['state'], unique=False)

    op.create_table('vouchers',
    sa.Column('voucher_hash', node.db.types.Hash32(length=66), nullable=False),
    sa.Column('payer', node.db.types.Address(length=42), nullable=False),
    sa.Column('node', node.db.types.Address(length=42), nullable=False),
    sa.Column('lane', sa.BigInteger(), nullable=False),
    sa.Column('cumulative', node.db.types.Amount(precision=78, scale=0), nullable=False),
    sa.Column('request_hash', node.db.types.Hash32(length=66), nullable=False),
    sa.Column('deadline', sa.BigInteger(), nullable=False),
    sa.Column('signature', sa.String(length=132), nullable=False),
    sa.Column('charged_total', node.db.types.Amount(precision=78, scale=0), nullable=False),
    sa.Column('created_at', node.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('voucher_hash', name=op.f('pk_vouchers'))
    )
    with op.batch_alter_table('vouchers', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_vouchers_payer_node_lane'), ['payer', 'node', 'lane'], unique=False)

    op.create_table('adapter_lineage',
    sa.Column('adapter_id', sa.BigInteger(), nullable=False),
    sa.Column('position', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('dataset_id', sa.BigInteger(), nullable=False),
    sa.Column('weight_bps', sa.Integer(), nullable=False),
    sa.Column('block_number', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['adapter_id'], ['adapters.adapter_id'], name=op.f('fk_adapter_lineage_adapter_id_adapters'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.dataset_id'], name=op.f('fk_adapter_lineage_dataset_id_datasets')),
    sa.PrimaryKeyConstraint('adapter_id', 'position', name=op.f('pk_adapter_lineage'))
    )
    with op.batch_alter_table('adapter_lineage', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_adapter_lineage_dataset_id'), ['dataset_id'], unique=False)

    op.create_table('receipts',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('receipt_hash', node.db.types.Hash32(length=66), nullable=False),
    sa.Column('voucher_hash', node.db.types.Hash32(length=66), nullable=False),
    sa.Column('node', node.db.types.Address(length=42), nullable=False),
    sa.Column('adapter_id', sa.BigInteger(), nullable=False),
    sa.Column('registry_block', sa.BigInteger(), nullable=False),
    sa.Column('lineage_hash', node.db.types.Hash32(length=66), nullable=False),
    sa.Column('prompt_tokens', sa.Integer(), nullable=False),
    sa.Column('completion_tokens', sa.Integer(), nullable=False),
    sa.Column('fee', node.db.types.Amount(precision=78, scale=0), nullable=False),
    sa.Column('output_hash', node.db.types.Hash32(length=66), nullable=False),
    sa.Column('method', sa.Integer(), nullable=False),
    sa.Column('signature', sa.String(length=132), nullable=False),
    sa.Column('created_at', node.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('epoch_id', sa.BigInteger(), nullable=True),
    sa.ForeignKeyConstraint(['node', 'epoch_id'], ['settlement_epochs.node', 'settlement_epochs.epoch_id'], name=op.f('fk_receipts_node_epoch_id_settlement_epochs')),
    sa.ForeignKeyConstraint(['voucher_hash'], ['vouchers.voucher_hash'], name=op.f('fk_receipts_voucher_hash_vouchers')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_receipts')),
    sa.UniqueConstraint('receipt_hash', name=op.f('uq_receipts_receipt_hash')),
    sa.UniqueConstraint('voucher_hash', name=op.f('uq_receipts_voucher_hash'))
    )
    with op.batch_alter_table('receipts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_receipts_node_epoch_id'), ['node', 'epoch_id'], unique=False)

    op.create_table('settlement_attempts',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('epoch_row_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('tx_hash', node.db.types.Hash32(length=66), nullable=False),
    sa.Column('nonce', sa.BigInteger(), nullable=False),
    sa.Column('max_fee_per_gas', node.db.types.Amount(precision=78, scale=0), nullable=False),
    sa.Column('max_priority_fee_per_gas', node.db.types.Amount(precision=78, scale=0), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('sent_at', node.db.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['epoch_row_id'], ['settlement_epochs.id'], name=op.f('fk_settlement_attempts_epoch_row_id_settlement_epochs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_settlement_attempts')),
    sa.UniqueConstraint('tx_hash', name=op.f('uq_settlement_attempts_tx_hash'))
    )
    with op.batch_alter_table('settlement_attempts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_settlement_attempts_epoch_row_id'), ['epoch_row_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('settlement_attempts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_settlement_attempts_epoch_row_id'))

    op.drop_table('settlement_attempts')
    with op.batch_alter_table('receipts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_receipts_node_epoch_id'))

    op.drop_table('receipts')
    with op.batch_alter_table('adapter_lineage', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_adapter_lineage_dataset_id'))

    op.drop_table('adapter_lineage')
    with op.batch_alter_table('vouchers', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_vouchers_payer_node_lane'))

    op.drop_table('vouchers')
    with op.batch_alter_table('settlement_epochs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_settlement_epochs_state'))

    op.drop_table('settlement_epochs')
    with op.batch_alter_table('settled_epochs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_settled_epochs_is_final_updated_block'))

    op.drop_table('settled_epochs')
    with op.batch_alter_table('raw_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_raw_events_is_final_block_number'))
        batch_op.drop_index(batch_op.f('ix_raw_events_entity_block_number_log_index'))
        batch_op.drop_index(batch_op.f('ix_raw_events_block_number'))

    op.drop_table('raw_events')
    op.drop_table('nodes')
    op.drop_table('lanes')
    with op.batch_alter_table('lane_collections', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_lane_collections_is_final_updated_block'))

    op.drop_table('lane_collections')
    op.drop_table('indexer_cursor')
    with op.batch_alter_table('escrow_accounts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_escrow_accounts_is_final_updated_block'))

    op.drop_table('escrow_accounts')
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_datasets_is_final_updated_block'))

    op.drop_table('datasets')
    with op.batch_alter_table('claims', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_claims_is_final_updated_block'))

    op.drop_table('claims')
    op.drop_table('chain_blocks')
    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_adapters_is_final_updated_block'))

    op.drop_table('adapters')
