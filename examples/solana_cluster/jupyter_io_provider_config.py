# A provider host joined to a coordinator that pays on a real Solana cluster.
# Use: jupyter io provider --config jupyter_io_provider_config.py
c = get_config()  # noqa: F821 (traitlets config file)

c.ProviderConfig.coordinator_url = "https://coord.example.org:8700"
# The host's key: users' escrows pay it, and it pays the settlement transactions' fees, so
# fund it with a little SOL on the coordinator's cluster.
c.ProviderConfig.keypair_path = "/etc/jupyter-io/provider-keypair.json"
# SOL per GPU-hour, per model (or one --price for all).
c.ProviderConfig.model_prices = ["RTX 4090=0.5", "A100=1.8"]
c.ProviderConfig.region = "eu-west"
