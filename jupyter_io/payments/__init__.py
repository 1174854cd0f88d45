"""Payments: ledger access (embedded LiteSVM or any Solana RPC), SOL escrow, metering."""
