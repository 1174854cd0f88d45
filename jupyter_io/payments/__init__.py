"""Payments: the SOL escrow and its client (any Solana JSON-RPC), amounts, token accounts,
payment hooks and the wallet command. The embedded LiteSVM ledger that the coordinator serves
for local use is :mod:`jupyter_io.coordinator.embedded_ledger`."""
