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

/** How often each part is fetched, in milliseconds. */
const OFFERS_INTERVAL = 10_000;
const SESSIONS_INTERVAL = 5_000;
const PROGRESS_FAST = 700;
const PROGRESS_SLOW = 5_000;
/** How long progress is polled fast after a start was asked for (the POST may take that). */
const EXPECT_LAUNCH_MS = 120_000;

/** What changed in the model. */
export type Change = 'offers' | 'wallet' | 'sessions' | 'launches' | 'preferences';

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
    this._clockSkew = body.now - Date.now() / 1000;
    this._changed.emit('sessions');
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
  private _disposed = false;
  private _offersPoll: Poll;
  private _sessionsPoll: Poll;
  private _progressPoll: Poll;
}
