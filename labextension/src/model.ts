import { Poll } from '@lumino/polling';
import { ISignal, Signal } from '@lumino/signaling';

import { errorMessage, requestAPI } from './handler';
import {
  ILaunch,
  IOffers,
  IPreferences,
  IPreferencesUpdate,
  IProgress,
  ISession,
  ISessions,
  IStoppedSession,
  IWallet
} from './types';

/** How often each part is fetched, in milliseconds. Sessions are cheap to ask for (the
 * server asks the coordinator only while a remote kernel runs or settles) and carry a
 * `version` that changes when offers or the wallet may have, which then are fetched at
 * once; the offers poll only catches other users' leases. Every poll stops while the page
 * is hidden. */
const OFFERS_INTERVAL = 10_000;
const SESSIONS_INTERVAL = 1_000;
/** Costs are shown in whole micro-SOL (6 decimals), so the digits do not dance. */
const COST_STEP = 1_000;
const PROGRESS_FAST = 700;
const PROGRESS_SLOW = 5_000;
/** How long progress is polled fast after a start was asked for (the POST may take that). */
const EXPECT_LAUNCH_MS = 120_000;

/** What changed in the model (`tick`: a second passed, running costs moved). */
export type Change = 'offers' | 'wallet' | 'sessions' | 'launches' | 'preferences' | 'tick';

/**
 * A running session's figures at one moment, from one snapshot, in exact lamports:
 * `cost + left === deposit` whenever the session has an escrow.
 */
export interface IFigures {
  /** Whole seconds since the lease began (null: not known). */
  elapsed: number | null;
  /** Price × elapsed, in whole micro-SOL steps, at most the deposit. */
  cost: number | null;
  /** What the escrow holds (top-ups included); null without an escrow. */
  deposit: number | null;
  /** `deposit - cost`; null without an escrow. */
  left: number | null;
}

/**
 * The client-side state of jupyter-io: offers, wallet, preferences, running remote kernels
 * and kernel starts, each polled from the server extension (polls pause while the page is
 * hidden). Listen to `changed`; call `refresh()` to fetch everything now.
 */
export class GpuModel {
  constructor() {
    this._offersPoll = new Poll({
      factory: () => this._fetchOffers(),
      frequency: { interval: OFFERS_INTERVAL, backoff: true, max: 60_000 },
      name: 'jupyter-io:offers',
      standby: 'when-hidden'
    });
    this._sessionsPoll = new Poll({
      factory: () => this._fetchSessions(),
      frequency: { interval: SESSIONS_INTERVAL, backoff: true, max: 60_000 },
      name: 'jupyter-io:sessions',
      standby: 'when-hidden'
    });
    this._progressPoll = new Poll({
      factory: () => this._fetchProgress(),
      frequency: { interval: PROGRESS_SLOW, backoff: true, max: 60_000 },
      name: 'jupyter-io:progress',
      standby: 'when-hidden'
    });
    void this.refreshWallet();
    // One clock for every view: the status bar and the picker show the same second.
    this._timer = window.setInterval(() => {
      this._now = Math.max(this._now, this._serverNow());
      if (this._sessions.some(s => s.state === 'running')) {
        this._changed.emit('tick');
      }
    }, 1000);
  }

  /** The server's time now, as the views last drew it (Unix seconds; moves each tick). */
  get now(): number {
    return this._now;
  }

  /**
   * A session's elapsed time, cost, deposit and escrow left at the model's `now`: the one
   * source the status bar, the picker and the notifications draw from.
   */
  figures(session: ISession): IFigures {
    const elapsed =
      session.state === 'running' && session.started_at !== null
        ? Math.floor(Math.max(0, this._now - session.started_at))
        : session.elapsed_seconds === null
          ? null
          : Math.floor(session.elapsed_seconds);
    const price = session.price_lamports_per_hour;
    let cost =
      price === null || elapsed === null
        ? null
        : Math.floor((price * elapsed) / 3600 / COST_STEP) * COST_STEP;
    const deposit = session.escrow_lamports;
    let left: number | null = null;
    if (deposit !== null) {
      cost = Math.min(cost ?? 0, deposit);
      left = deposit - cost;
    }
    return { elapsed, cost, deposit, left };
  }

  /** Emitted with what changed. */
  get changed(): ISignal<this, Change> {
    return this._changed;
  }

  get offers(): IOffers | null {
    return this._offers;
  }

  /** Why the last offers fetch failed (null after a good one). */
  get offersError(): string | null {
    return this._offersError;
  }

  get wallet(): IWallet | null {
    return this._wallet;
  }

  get walletError(): string | null {
    return this._walletError;
  }

  get preferences(): IPreferences | null {
    return this._preferences;
  }

  get sessions(): ISession[] {
    return this._sessions;
  }

  /** Kernels the coordinator stopped because their escrow was spent. */
  get stopped(): IStoppedSession[] {
    return this._stopped;
  }

  /** The server's time (Unix seconds) of the sessions' figures. */
  get sessionsAt(): number {
    return this._sessionsAt;
  }

  /** The server's clock minus ours, in seconds (costs are extrapolated with it). */
  get clockSkew(): number {
    return this._clockSkew;
  }

  get launches(): ILaunch[] {
    return this._launches;
  }

  /** When this model started (Unix seconds): starts before it are history, not news. */
  readonly createdAt = Date.now() / 1000;

  /** The session of kernel `kernelId`, if it is a jupyter-io kernel. */
  session(kernelId: string | null | undefined): ISession | null {
    if (!kernelId) {
      return null;
    }
    return this._sessions.find(s => s.kernel_id === kernelId) ?? null;
  }

  /** Fetch everything now. */
  async refresh(): Promise<void> {
    await Promise.all([
      this._offersPoll.refresh(),
      this._sessionsPoll.refresh(),
      this._progressPoll.refresh(),
      this.refreshWallet()
    ]);
  }

  async refreshOffers(): Promise<void> {
    await this._offersPoll.refresh();
    await this._offersPoll.tick;
  }

  async refreshWallet(): Promise<void> {
    try {
      this._wallet = await requestAPI<IWallet>('wallet');
      this._walletError = null;
    } catch (error) {
      this._walletError = errorMessage(error);
    }
    this._changed.emit('wallet');
  }

  /** Ask the ledger for test SOL (the local ledger, devnet). Rejects with its message. */
  async airdrop(lamports = 1_000_000_000): Promise<IWallet> {
    this._wallet = await requestAPI<IWallet>('wallet/airdrop', {
      method: 'POST',
      body: JSON.stringify({ lamports })
    });
    this._changed.emit('wallet');
    return this._wallet;
  }

  /** Add `lamports` from the wallet to kernel `kernelId`'s escrow; rejects with the
   * server's message (the wallet is short, the lease has no escrow). */
  async topUp(kernelId: string, lamports: number): Promise<ISession> {
    const session = await requestAPI<ISession>(`sessions/${kernelId}/topup`, {
      method: 'POST',
      body: JSON.stringify({ lamports })
    });
    void this._sessionsPoll.refresh();
    void this.refreshWallet();
    return session;
  }

  async fetchPreferences(): Promise<IPreferences> {
    this._preferences = await requestAPI<IPreferences>('preferences');
    this._changed.emit('preferences');
    return this._preferences;
  }

  /** Store preferences on the server; rejects with the server's validation message. */
  async savePreferences(update: IPreferencesUpdate): Promise<IPreferences> {
    this._preferences = await requestAPI<IPreferences>('preferences', {
      method: 'PUT',
      body: JSON.stringify(update)
    });
    this._changed.emit('preferences');
    // The cap changes the kernelspecs and which offers are within it.
    void this._offersPoll.refresh();
    return this._preferences;
  }

  /** A kernel start was just asked for: watch progress closely for a while. */
  expectLaunch(): void {
    this._expectUntil = Date.now() + EXPECT_LAUNCH_MS;
    this._progressPoll.frequency = {
      interval: PROGRESS_FAST,
      backoff: false,
      max: 60_000
    };
    void this._progressPoll.refresh();
  }

  dispose(): void {
    if (this._disposed) {
      return;
    }
    this._disposed = true;
    window.clearInterval(this._timer);
    this._offersPoll.dispose();
    this._sessionsPoll.dispose();
    this._progressPoll.dispose();
    Signal.clearData(this);
  }

  private async _fetchOffers(): Promise<void> {
    try {
      this._offers = await requestAPI<IOffers>('offers');
      this._preferences = this._offers.preferences;
      this._offersError = null;
    } catch (error) {
      this._offersError = errorMessage(error);
      this._changed.emit('offers');
      throw error; // back off
    }
    this._changed.emit('offers');
  }

  private async _fetchSessions(): Promise<void> {
    const body = await requestAPI<ISessions>('sessions');
    this._sessions = body.sessions;
    this._stopped = body.stopped ?? [];
    this._sessionsAt = body.now;
    // The answer's latency makes a sample of the skew low by that much, and it varies:
    // keep the highest sample unless the clocks really moved apart, and never let the
    // shown time step back (a second would flicker at its edge).
    const skew = body.now - Date.now() / 1000;
    const first = this._version === null;
    const jumped = Math.abs(skew - this._clockSkew) > 1;
    if (first || jumped || skew > this._clockSkew) {
      this._clockSkew = skew;
    }
    this._now = first || jumped ? this._serverNow() : Math.max(this._now, this._serverNow());
    const moved = !first && body.version !== this._version;
    this._version = body.version;
    this._changed.emit('sessions');
    if (moved) {
      // A start's step, a kernel's end, a settlement, a top-up: what is free and what the
      // wallet holds changed with it.
      void this._offersPoll.refresh();
      void this._progressPoll.refresh();
      void this.refreshWallet();
    }
  }

  private _serverNow(): number {
    return Date.now() / 1000 + this._clockSkew;
  }

  private async _fetchProgress(): Promise<void> {
    const body = await requestAPI<IProgress>('progress');
    const before = JSON.stringify(this._launches.map(l => [l.kernel_id, l.updated_at]));
    this._launches = body.launches;
    const starting = this._launches.some(l => l.state === 'starting');
    const fast = starting || Date.now() < this._expectUntil;
    this._progressPoll.frequency = {
      interval: fast ? PROGRESS_FAST : PROGRESS_SLOW,
      backoff: !fast,
      max: 60_000
    };
    const after = JSON.stringify(this._launches.map(l => [l.kernel_id, l.updated_at]));
    if (before !== after) {
      this._changed.emit('launches');
      if (!starting) {
        // A start just ended: the new kernel's session is worth showing now, and the
        // wallet paid its escrow.
        void this._sessionsPoll.refresh();
        void this.refreshWallet();
      }
    }
  }

  private _changed = new Signal<this, Change>(this);
  private _offers: IOffers | null = null;
  private _offersError: string | null = null;
  private _wallet: IWallet | null = null;
  private _walletError: string | null = null;
  private _preferences: IPreferences | null = null;
  private _sessions: ISession[] = [];
  private _stopped: IStoppedSession[] = [];
  private _sessionsAt = 0;
  private _clockSkew = 0;
  private _launches: ILaunch[] = [];
  private _expectUntil = 0;
  private _version: number | null = null;
  private _now = Date.now() / 1000;
  private _timer: number;
  private _disposed = false;
  private _offersPoll: Poll;
  private _sessionsPoll: Poll;
  private _progressPoll: Poll;
}
