/** The extension's command ids (run them from the palette or `app.commands.execute`). */
export namespace CommandIDs {
  /** Show the GPU picker in the left sidebar. */
  export const openPicker = 'jupyter-io:open-picker';
  /** Open a new notebook on a GPU kernelspec: args `{kernelName}`. */
  export const newNotebook = 'jupyter-io:new-notebook';
  /** Open a new console on a GPU kernelspec: args `{kernelName}`. */
  export const newConsole = 'jupyter-io:new-console';
  /** Fetch offers, wallet, sessions and progress now. */
  export const refresh = 'jupyter-io:refresh';
  /** Ask the configured ledger for 1 SOL of test funds. */
  export const airdrop = 'jupyter-io:airdrop';
  /** Add SOL from the wallet to a GPU kernel's escrow: args `{kernelId}` (default: the
   * current kernel); asks how much. */
  export const topUp = 'jupyter-io:top-up';
  /** Join a class: args `{code}` (a join code or `jupyter-io:join?...` link); asks without. */
  export const joinCohort = 'jupyter-io:join-cohort';
  /** Open a class's dashboard (instructors): args `{cohortId}` (default: the first taught). */
  export const openDashboard = 'jupyter-io:open-dashboard';
  /** Bring files the remote kernel holds back (too large to come back on their own):
   * args `{kernelId, paths}` (paths relative to the notebook's directory); from the file
   * browser's context menu, the file clicked; without, every held-back file of the current
   * kernel (or of every remote kernel). */
  export const pullFiles = 'jupyter-io:pull-files';
}
