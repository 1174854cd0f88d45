"""The provider daemon: hosts kernels on this machine's GPUs and serves their tunnels."""
