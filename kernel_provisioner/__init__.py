"""The jupyter_client provisioner for remote kernels and its local end of the tunnel."""
