import { Widget } from '@lumino/widgets';

import { duration, sol, solShort } from './format';
import { roundTripText, roundTripTitle } from './latency';
import { GpuModel } from './model';

/**
 * The status bar item for the current notebook's or console's kernel when it runs on
 * jupyter-io: `RTX 4090 · 12:03 · 0.024100 SOL · escrow left 0.095900 SOL`. Elapsed time,
 * cost and escrow left are the model's figures (`GpuModel.figures`, the picker shows the
 * same) and tick with its clock; cost + escrow left is the deposit. It turns amber at
 * 80 % of the escrow spent and red at 95 %; a click tops the escrow up (`onTopUp`).
 */
export class CostStatus extends Widget {
  constructor(options: CostStatus.IOptions) {
    super();
    this._model = options.model;
    this._currentKernelId = options.currentKernelId;
    this._onTopUp = options.onTopUp;
    this.addClass('jio-CostStatus');
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
    const { elapsed, cost, deposit, left } = this._model.figures(session);
    const price = session.price_lamports_per_hour;
    const parts = [gpu];
    if (elapsed !== null) {
      parts.push(duration(elapsed));
    }
    if (cost !== null) {
      parts.push(solShort(cost));
    }
    if (left !== null) {
      parts.push(`escrow left ${solShort(left)}`);
    } else if (session.budget_lamports !== null && cost !== null) {
      parts.push(`budget left ${solShort(Math.max(0, session.budget_lamports - cost))}`);
    }
    const roundTrip = roundTripText(session.round_trip);
    if (roundTrip !== null) {
      parts.push(roundTrip);
    }
    this.node.textContent = parts.join(' · ');
    this.toggleClass('jio-mod-slow', !!session.round_trip?.degraded);
    this.node.dataset.kernelId = session.kernel_id;
    this._mark(session.warning);
    const escrow =
      session.escrow !== null
        ? [
            `Escrow: ${session.escrow}`,
            `Deposit: ${sol(deposit)} = cost ${solShort(cost)} + left ${solShort(left)}`,
            'Click to top up the escrow from the wallet.'
          ]
        : ['Escrow: none (a free pool, or a provider named directly)'];
    this.node.title = [
      `jupyter-io kernel ${session.kernel_id}`,
      session.gpu ? `GPU: ${session.gpu}` : null,
      price !== null ? `Price: ${sol(price)} per hour` : null,
      session.provider ? `Provider: ${session.provider}${session.relay ? ' (through the relay)' : ''}` : null,
      session.lease ? `Lease: ${session.lease}` : null,
      ...roundTripTitle(session.round_trip),
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

  private _model: GpuModel;
  private _currentKernelId: () => string | null;
  private _onTopUp: (kernelId: string) => void;
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
