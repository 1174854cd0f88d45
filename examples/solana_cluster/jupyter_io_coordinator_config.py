# jupyter io coordinator on a real Solana cluster: escrow payments verified on-chain.
# Use: copy to ~/.jupyter/jupyter_io_coordinator_config.py, or
#      jupyter io coordinator --config jupyter_io_coordinator_config.py
c = get_config()  # noqa: F821 (traitlets config file)

c.CoordinatorConfig.listen = "0.0.0.0:8700"
c.CoordinatorConfig.public_url = "https://coord.example.org:8700"
c.CoordinatorConfig.certfile = "/etc/jupyter-io/cert.pem"
c.CoordinatorConfig.keyfile = "/etc/jupyter-io/key.pem"

# Every lease is paid through a 2-of-3 wSOL escrow on this cluster (the default mode).
c.CoordinatorConfig.payments = "escrow"
# Any JSON-RPC URL: devnet to try it, mainnet-beta for real money, or your own validator.
# Empty would mean the embedded ledger (local use only).
c.CoordinatorConfig.solana_url = "https://api.devnet.solana.com"
c.CoordinatorConfig.solana_timeout = 30.0
# The coordinator's own key: it signs lease tokens and co-signs settlements (the arbiter).
# It pays no escrow, but keep a little SOL on it for the refunds it submits.
c.CoordinatorConfig.keypair_path = "/etc/jupyter-io/coordinator-keypair.json"
# The smallest escrow accepted: a minute of GPU time at the leased price.
c.CoordinatorConfig.min_deposit_seconds = 60
# Settlements are retried until the cluster confirms them.
c.CoordinatorConfig.settle_retry_interval = 10.0
