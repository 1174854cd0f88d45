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
  /** Mean 30-day reliability of its measured providers, 0..1 (null: none measured yet). */
  reliability: number | null;
  benchmark_tflops: number | null;
  simulated: boolean;
  /** The kernelspec that starts a kernel on this type (null: no GPU kernelspecs). */
  kernel_name: string | null;
  display_name: string | null;
  /** Whether the cheapest free GPU is within the user's price cap. */
  within_cap: boolean;
  /** The best round trip measured from this server to a provider of the type, ms. */
  latency_ms?: number | null;
  /** That figure went through the coordinator's relay (its ping + its hop). */
  latency_via_relay?: boolean | null;
  /** `measured`, `pending` (not measured yet) or `unreachable` (no provider answered). */
  latency_state?: 'measured' | 'pending' | 'unreachable';
}

/** A provider's measured record over 30 days (docs/coordinator-contract.md). */
export interface IReliability {
  /** Sessions completed (weighted per user) × uptime, 0..1. */
  score: number;
  sessions: number;
  lost: number;
  uptime: number;
  /** ISO time the evidence starts. */
  since: string;
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
  /** Its provider's record, or null: not measured (no record yet, e.g. a new key). */
  reliability: IReliability | null;
  benchmark_tflops: number | null;
  simulated: boolean;
  reachable: boolean;
  latency_ms?: number | null;
  latency_via_relay?: boolean | null;
  latency_unreachable?: boolean | null;
}

export interface IPreferences {
  max_price_per_hour: string | null;
  max_price_lamports_per_hour: number | null;
  max_price_display: string | null;
  region: string | null;
  /** Most round trip accepted, ms (null: no cap). */
  max_latency_ms?: number | null;
  /** Least measured reliability to lease from, 0..1 (null: any provider). */
  min_reliability?: number | null;
  session_budget_hours: number | null;
}

/** What `PUT preferences` takes: fields left out keep their value, null clears one. */
export interface IPreferencesUpdate {
  max_price_per_hour?: string | null;
  region?: string | null;
  max_latency_ms?: number | null;
  min_reliability?: number | null;
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
  /** The class paying for it (null: the user's own wallet). */
  cohort?: string | null;
  /** Stops coming (idle, max length, quota), newest last. */
  warnings?: ILeaseWarning[];
  /** The tunnel's round trip (keepalive pings) and the one measured before the lease. */
  round_trip?: IRoundTrip;
}

/** A running kernel's tunnel round trip (`GET sessions` → `sessions[].round_trip`). */
export interface IRoundTrip {
  /** The last keepalive round trip, ms (null: not measured yet, or disconnected). */
  ms: number | null;
  /** The best of the session, ms. */
  best_ms: number | null;
  /** Much worse than the best for a while (the server decides: 2x and +30 ms for 30 s). */
  degraded: boolean;
  degraded_for_s: number;
  /** Measured before the lease, from this server, ms. */
  measured_ms: number | null;
  via_relay: boolean | null;
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

/** A student's week in a cohort (a dashboard row; a student's own `me`). GPU-seconds are
 * billed seconds × GPUs; the week is the ISO week in UTC. */
export interface IStudentUsage {
  student: string;
  gpu_seconds_week: number;
  cost_lamports_week: number;
  live_kernels: number;
  /** Seconds the student's live kernel has been idle (null: none live, or not known). */
  idle_seconds: number | null;
  /** Queue tickets waiting. */
  queued: number;
  quota_left_gpu_seconds: number;
  /** When the week's quota resets (next Monday 00:00 UTC). */
  week_resets_at: number;
  joined_at: number | null;
  /** The student's allowance as the coordinator read it on-chain (dashboard rows only; null:
   * none on-chain, or a coordinator without a pool). docs/cohorts.md, "The pool on the dashboard". */
  allowance: IAllowance | null;
}

/** A student's allowance on-chain: what it holds and what their sessions can still draw. */
export interface IAllowance {
  address: string;
  /** False when the account is not what the class agreed: nothing can be spent from it. */
  as_agreed: boolean;
  problem: string | null;
  amount_lamports: number | null;
  delegated_lamports: number | null;
  /** min(amount, delegated): what the student's sessions can still draw. */
  spendable_lamports: number;
}

/** One GPU type a cohort pays for, joined with the offers (`GET cohorts` → `gpus`). */
export interface ICohortGpu {
  gpu: string;
  display: string;
  available: number;
  total: number;
  /** Whether any provider offers it now. */
  offered: boolean;
  price_min?: number | null;
  simulated?: boolean;
  /** The kernelspec that starts a kernel on it, paid by the cohort. */
  kernel_name: string;
}

export type CohortRole = 'instructor' | 'co_instructor' | 'student';

/** A class (`GET cohorts` → `cohorts`). */
export interface ICohort {
  id: string;
  name: string;
  role: CohortRole | null;
  instructor: string;
  gpu_types: string[];
  max_price_lamports_per_hour: number;
  quota_gpu_seconds_per_week: number;
  max_concurrent_per_student: number;
  idle_timeout_seconds: number;
  max_session_seconds: number;
  term_ends_at: number;
  state: 'active' | 'ended';
  students: number;
  /** The caller's week, when a student. */
  me: IStudentUsage | null;
  /** A student's: the cohort's GPU types with a kernelspec each. */
  gpus?: ICohortGpu[];
}

export interface ICohorts {
  coordinator_url: string;
  cohorts: ICohort[];
  now: number;
}

/** One queued start (`dashboard` → `queue`). */
export interface IQueueEntry {
  ticket?: string;
  student?: string;
  gpu?: string;
  place?: number;
  estimated_wait_seconds?: number | null;
  queued_at?: number;
  [detail: string]: unknown;
}

/** The instructor's dashboard (`GET cohorts/{id}/dashboard`). */
export interface IDashboard {
  cohort: ICohort;
  students: IStudentUsage[];
  pool: {
    allowance_lamports: number | null;
    spent_lamports_term: number;
    /** When the pool runs out at this term's pace (null: not projected). */
    projected_run_out: number | null;
    [detail: string]: unknown;
  };
  queue: IQueueEntry[];
  generated_at: number;
}

/** A warning on a running lease: idle stop, max length or quota coming (`sessions` rows). */
export interface ILeaseWarning {
  kind: 'idle' | 'max_length' | 'quota' | string;
  /** When the kernel will be stopped (Unix seconds). */
  at: number;
  message: string;
}
