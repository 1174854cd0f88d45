import { Widget } from '@lumino/widgets';

import { duration, sol, solShort } from './format';
import { GpuModel } from './model';
import { ISession } from './types';

/** What is left of a session's escrow now: the coordinator's figure, less what the price
 * has cost since the server computed it (so it falls every second between fetches). */
export function escrowLeft(model: GpuModel, session: ISession): number | null {
  if (session.escrow_left_lamports === null) {
    return null;
  }
  const price = session.price_lamports_per_hour ?? 0;
  const now = Date.now() / 1000 + model.clockSkew;
  const since = session.state === 'running' ? Math.max(0, now - model.sessionsAt) : 0;
  return Math.max(0, session.escrow_left_lamports - (price * since) / 3600);
}

/**
 * The status bar item for the current notebook's or console's kernel when it runs on
 * jupyter-io: `RTX 4090 · 12:03 · 0.024100 SOL · escrow left 0.095900 SOL`. Elapsed time,
 * cost and escrow left tick every second between fetches (price × elapsed, as the server
 * computes them). It turns amber at 80 % of the escrow spent and red at 95 %; a click tops
 * the escrow up (`onTopUp`).
 */
export class CostStatus extends Widget {
  constructor(options: CostStatus.IOptions) {
    super();
    this._model = options.model;
    this._currentKernelId = options.currentKernelId;
    this._onTopUp = options.onTopUp;
    this.addClass('jio-CostStatus');
    this._timer = window.setInterval(() => this._render(), 1000);
    this._model.changed.connect(this._render, this);
    this.node.addEventListener('click', () => {
      const session = this._model.session(this._currentKernelId());
      if (session && session.escrow !== null && session.state === 'running') {
        this._onTopUp(session.kernel_id);
      }
    });
    this._render();
  }

  dispose(): void {
    window.clearInterval(this._timer);
    this._model.changed.disconnect(this._render, this);
    super.dispose();
  }

  private _render(): void {
    const session = this._model.session(this._currentKernelId());
    if (!session) {
      this.node.textContent = '';
      this.node.title = '';
      this.addClass('jio-mod-hidden');
      return;
    }
    this.removeClass('jio-mod-hidden');
    const gpu = session.gpu ?? 'remote kernel';
    if (session.state === 'starting') {
      this.node.textContent = `${gpu} · starting…`;
      this.node.dataset.kernelId = session.kernel_id;
      this.node.title = `jupyter-io kernel ${session.kernel_id} is starting`;
      this._mark(null);
      return;
    }
    if (session.state === 'stopped') {
      const reason = session.end_reason ?? 'its lease ended';
      this.node.textContent = `${gpu} · stopped: ${reason} · cost ${sol(session.escrow_spent_lamports ?? session.cost_lamports)}`;
      this.node.dataset.kernelId = session.kernel_id;
      this.node.title = `The coordinator ended lease ${session.lease} (${reason}); the kernel stops.`;
      this._mark(100);
      return;
    }
    const now = Date.now() / 1000 + this._model.clockSkew;
    const elapsed =
      session.started_at !== null ? Math.max(0, now - session.started_at) : null;
    const price = session.price_lamports_per_hour;
    const cost = price !== null && elapsed !== null ? (price * elapsed) / 3600 : null;
    const parts = [gpu];
    if (elapsed !== null) {
      parts.push(duration(elapsed));
    }
    if (cost !== null) {
      parts.push(solShort(cost));
    }
    const left = this._left(session, cost);
    if (left) {
      parts.push(left);
    }
    this.node.textContent = parts.join(' · ');
    this.node.dataset.kernelId = session.kernel_id;
    this._mark(session.warning);
    const escrow =
      session.escrow !== null
        ? [
            `Escrow: ${session.escrow}`,
            `Deposit: ${sol(session.escrow_lamports)}, spent ${sol(session.escrow_spent_lamports)} ` +
              `(${Math.round((session.used_fraction ?? 0) * 100)} %)`,
            'Click to top up the escrow from the wallet.'
          ]
        : ['Escrow: none (a free pool, or a provider named directly)'];
    this.node.title = [
      `jupyter-io kernel ${session.kernel_id}`,
      session.gpu ? `GPU: ${session.gpu}` : null,
      price !== null ? `Price: ${sol(price)} per hour` : null,
      session.provider ? `Provider: ${session.provider}${session.relay ? ' (through the relay)' : ''}` : null,
      session.lease ? `Lease: ${session.lease}` : null,
      ...escrow
    ]
      .filter(Boolean)
      .join('\n');
  }

  /** Amber from 80 % of the escrow spent, red from 95 % (and once stopped). */
  private _mark(warning: number | null): void {
    this.toggleClass('jio-mod-warning', warning !== null && warning >= 80 && warning < 95);
    this.toggleClass('jio-mod-danger', warning !== null && warning >= 95);
  }

  /** `escrow left 0.04 SOL`, else `budget left …` from the session budget, else null. */
  private _left(session: ISession, cost: number | null): string | null {
    const left = escrowLeft(this._model, session);
    if (left !== null) {
      return `escrow left ${solShort(left)}`;
    }
    if (session.budget_lamports !== null && cost !== null) {
      return `budget left ${solShort(Math.max(0, session.budget_lamports - cost))}`;
    }
    return null;
  }

  private _model: GpuModel;
  private _currentKernelId: () => string | null;
  private _onTopUp: (kernelId: string) => void;
  private _timer: number;
}

export namespace CostStatus {
  export interface IOptions {
    model: GpuModel;
    /** The kernel id of the current notebook or console, if any. */
    currentKernelId: () => string | null;
    /** Top up the escrow of kernel `kernelId` (the item was clicked). */
    onTopUp: (kernelId: string) => void;
  }
}
