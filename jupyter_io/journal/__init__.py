"""The state journal (issue 16): a remote kernel's variables, kept on the user's machine.

:mod:`.snapshot` holds the pure parts (what is kept, how, the manifest), :mod:`.kernel_ext`
the IPython extension that writes the journal in the kernel's workspace;
:mod:`kernel_provisioner.journal` carries it back after each cell and restores it into a
new kernel.
"""
