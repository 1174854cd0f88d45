import { Widget } from '@lumino/widgets';

import { duration, sol, solShort } from './format';
import { GpuModel } from './model';
import { ISession } from './types';

/**
 * The status bar item for the current notebook's or console's kernel when it runs on
 * jupyter-io: `RTX 4090 · 12:03 · 0.024100 SOL · escrow left …`. Elapsed time and cost
 * tick every second between fetches (price × elapsed, as the server computes them).
 */
export class CostStatus extends Widget {
  constructor(options: CostStatus.IOptions) {
    super();
    this._model = options.model;
    this._currentKernelId = options.currentKernelId;
    this.addClass('jio-CostStatus');
    this._timer = window.setInterval(() => this._render(), 1000);
    this._model.changed.connect(this._render, this);
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
    const now = Date.now() / 1000 + this._model.clockSkew;
    const elapsed =
      session.started_at !== null ? Math.max(0, now - session.started_at) : null;
    const price = session.price_lamports_per_hour;
    const cost = price !== null && elapsed !== null ? (price * elapsed) / 3600 : null;
    const parts = [session.gpu ?? 'remote kernel'];
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
    this.node.title = [
      `jupyter-io kernel ${session.kernel_id}`,
      session.gpu ? `GPU: ${session.gpu}` : null,
      price !== null ? `Price: ${sol(price)} per hour` : null,
      session.provider ? `Provider: ${session.provider}${session.relay ? ' (through the relay)' : ''}` : null,
      session.lease ? `Lease: ${session.lease}` : null,
      session.escrow_lamports !== null
        ? `Escrow: ${sol(session.escrow_lamports)}`
        : 'Escrow: none yet (payments are not wired into kernels yet)'
    ]
      .filter(Boolean)
      .join('\n');
  }

  /** `escrow left 0.04 SOL`, else `budget left …` from the session budget, else null. */
  private _left(session: ISession, cost: number | null): string | null {
    if (session.escrow_left_lamports !== null) {
      return `escrow left ${solShort(session.escrow_left_lamports)}`;
    }
    if (session.budget_lamports !== null && cost !== null) {
      return `budget left ${solShort(Math.max(0, session.budget_lamports - cost))}`;
    }
    return null;
  }

  private _model: GpuModel;
  private _currentKernelId: () => string | null;
  private _timer: number;
}

export namespace CostStatus {
  export interface IOptions {
    model: GpuModel;
    /** The kernel id of the current notebook or console, if any. */
    currentKernelId: () => string | null;
  }
}
