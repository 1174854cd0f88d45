/**
 * The JSON bodies of the server extension's REST API (`{baseUrl}/jupyter-io/...`), as
 * jupyter_io/serverext/handlers.py serves them. Amounts are integer lamports; prices are
 * lamports per GPU-hour; times are Unix seconds.
 */

/** One GPU type on offer (`GET offers` → `types`). */
export interface IGpuType {
  /** The coordinator's key for the type (what a lease names). */
  gpu: string;
  /** The type's name for people, e.g. "RTX 4090". */
  display: string;
  vram_bytes: number;
  offers: number;
  available: number;
  total: number;
  price_min: number | null;
  price_median: number | null;
  /** The dearest free offer's price (absent when the server cannot tell). */
  price_max?: number | null;
  regions: string[];
  reliability: number;
  benchmark_tflops: number | null;
  simulated: boolean;
  /** The kernelspec that starts a kernel on this type (null: no GPU kernelspecs). */
  kernel_name: string | null;
  display_name: string | null;
  /** Whether the cheapest free GPU is within the user's price cap. */
  within_cap: boolean;
}

/** One provider's offer of one GPU type (`GET offers` → `providers`). */
export interface IProviderOffer {
  provider: string;
  gpu: string;
  vram_bytes: number;
  count: number;
  free: number;
  price_lamports_per_hour: number;
  region: string;
  reliability: number;
  benchmark_tflops: number | null;
  simulated: boolean;
  reachable: boolean;
}

export interface IPreferences {
  max_price_per_hour: string | null;
  max_price_lamports_per_hour: number | null;
  max_price_display: string | null;
  region: string | null;
  session_budget_hours: number | null;
}

/** What `PUT preferences` takes: fields left out keep their value, null clears one. */
export interface IPreferencesUpdate {
  max_price_per_hour?: string | null;
  region?: string | null;
  session_budget_hours?: number | null;
}

export interface IOffers {
  coordinator_url: string;
  fetched_at: number;
  types: IGpuType[];
  providers: IProviderOffer[];
  preferences: IPreferences;
  gpu_kernelspecs: boolean;
}

export interface IWallet {
  address: string | null;
  keypair_path: string;
  rpc_url: string | null;
  balance_lamports: number | null;
  balance: string | null;
  note: string | null;
}

/** A starting or running remote kernel (`GET sessions` → `sessions`). */
export interface ISession {
  kernel_id: string;
  kernel_name: string;
  /** `stopped`: the coordinator ended its lease (`end_reason`), the kernel is going away. */
  state: 'starting' | 'running' | 'stopped';
  gpu: string | null;
  provider: string | null;
  lease: string | null;
  relay: boolean | null;
  price_lamports_per_hour: number | null;
  started_at: number | null;
  elapsed_seconds: number | null;
  cost_lamports: number | null;
  cost: string | null;
  budget_lamports: number | null;
  budget_left_lamports: number | null;
  /** The lease's escrow account, as the coordinator bills it (null: no escrow). */
  escrow: string | null;
  /** What the escrow holds (the deposit, top-ups included). */
  escrow_lamports: number | null;
  escrow_left_lamports: number | null;
  escrow_spent_lamports: number | null;
  billed_seconds: number | null;
  used_fraction: number | null;
  /** 80, 95 or 100 once that share of the deposit is spent. */
  warning: number | null;
  lease_state: string | null;
  end_reason: string | null;
  coordinator_url: string | null;
  provider_url: string | null;
}

/** A lease the coordinator ended because its deposit was spent (`GET sessions` → `stopped`). */
export interface IStoppedSession {
  kernel_id: string;
  lease: string;
  gpu: string;
  ended_at: number | null;
  reason: string;
  escrow_lamports: number | null;
  escrow_spent_lamports: number | null;
  message: string;
  advice: string;
}

export interface ISessions {
  sessions: ISession[];
  stopped: IStoppedSession[];
  /** Why the escrow figures are missing (the coordinator could not be asked), if they are. */
  billing_error: string | null;
  /** Changes when offers or the wallet may have changed (a kernel's start or end, a
   * settlement, a top-up, an airdrop): fetch them again. */
  version: number;
  now: number;
}

/** One step of a kernel's start, as the provisioner reported it. */
export interface IProgressEvent {
  step: string;
  kernel_id: string;
  message: string;
  at: number;
  [detail: string]: unknown;
}

/** A kernel's latest start (`GET progress` → `launches`). */
export interface ILaunch {
  kernel_id: string;
  state: 'starting' | 'ready' | 'failed';
  step: string;
  message: string;
  started_at: number;
  updated_at: number;
  gpu?: string;
  price_lamports_per_hour?: number;
  events: IProgressEvent[];
}

export interface IProgress {
  launches: ILaunch[];
  now: number;
}
