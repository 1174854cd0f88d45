# A user's Jupyter Server / JupyterLab renting GPUs from a coordinator on a real Solana cluster.
# Use: copy to ~/.jupyter/jupyter_server_config.py (or merge into yours).
c = get_config()  # noqa: F821 (traitlets config file)

# The GPU picker's offers and one kernelspec per GPU type on offer come from here.
c.JupyterIOExtension.coordinator_url = "https://coord.example.org:8700"
# Your wallet: it signs lease requests and pays each session's escrow.
c.JupyterIOExtension.keypair_path = "~/.config/solana/id.json"
# The ledger the wallet view reads (address, balance). Empty: the one the coordinator names.
c.JupyterIOExtension.solana_rpc_url = "https://api.devnet.solana.com"
# The escrows themselves go to the ledger the coordinator names; pin it if you prefer.
c.SolanaEscrowHook.solana_url = "https://api.devnet.solana.com"
# Hours of GPU time each session escrows when Lab's setting "Session budget (hours)" is
# empty (deposit = price * hours); the coordinator stops the kernel when they are spent.
c.SolanaEscrowHook.max_session_hours = 1.0

# A provider you reach directly (no coordinator, no escrow: it admits your key by its
# allow-list) gets a kernelspec of its own, jupyter-io-direct-gpu-box.
c.JupyterIOExtension.direct_providers = [
    {
        "name": "gpu-box",
        "url": "wss://gpu-box.example.org:8765/tunnel",
        "display_name": "Python 3 · gpu-box (direct)",
        # "pubkey": "<the host key it prints>",  # only that host gets the session
    }
]
