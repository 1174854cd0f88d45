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

/** A running remote kernel (`GET sessions` → `sessions`). */
export interface ISession {
  kernel_id: string;
  kernel_name: string;
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
  escrow_lamports: number | null;
  escrow_left_lamports: number | null;
}

export interface ISessions {
  sessions: ISession[];
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
