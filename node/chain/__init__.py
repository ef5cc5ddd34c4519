"""Everything that talks to the chain: web3 client, contract bindings, EIP-712, indexer, tx manager."""
