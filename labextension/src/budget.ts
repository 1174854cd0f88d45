import { Notification } from '@jupyterlab/apputils';

import { hours, sol, solShort } from './format';
import { GpuModel } from './model';
import { ISession, IStoppedSession } from './types';

/**
 * Tells the user when a GPU kernel's escrow runs low and when it ran out, once each:
 * a warning at 80 % and at 95 % of the deposit spent (the coordinator's figures), with a
 * Top up action, and an error when the coordinator stopped the kernel because the whole
 * deposit was spent (budget exhausted), saying what to do.
 */
export class BudgetNotifier {
  constructor(options: BudgetNotifier.IOptions) {
    this._model = options.model;
    this._onTopUp = options.onTopUp;
    this._onSettings = options.onSettings;
    this._model.changed.connect((_, change) => {
      if (change === 'sessions') {
        this._update();
      }
    });
  }

  private _update(): void {
    for (const session of this._model.sessions) {
      const warning = session.warning;
      if (session.lease && warning !== null && warning < 100) {
        const key = `${session.lease}@${warning}`;
        if (!this._shown.has(key)) {
          this._shown.add(key);
          this._warn(session, warning);
        }
      }
    }
    for (const stopped of this._model.stopped) {
      if (stopped.ended_at !== null && stopped.ended_at < this._model.createdAt - 60) {
        continue; // ran out long before this page loaded: history, not news
      }
      const key = `${stopped.lease}@stopped`;
      if (!this._shown.has(key)) {
        this._shown.add(key);
        this._stopped(stopped);
      }
    }
  }

  private _warn(session: ISession, warning: number): void {
    const left = this._model.figures(session).left ?? 0;
    const price = session.price_lamports_per_hour ?? 0;
    const time = price > 0 ? ` (about ${hours(left / price)})` : '';
    const message =
      `${session.gpu ?? 'GPU'} kernel has spent ${warning} % of its escrow: ${solShort(left)} ` +
      `left${time}. Top up, or save your work.`;
    Notification.warning(message, {
      autoClose: false,
      data: { kernelId: session.kernel_id, lease: session.lease, warning },
      actions: [
        {
          label: 'Top up',
          caption: 'Add SOL from the wallet to this kernel’s escrow',
          callback: () => this._onTopUp(session.kernel_id)
        }
      ]
    });
  }

  private _stopped(stopped: IStoppedSession): void {
    const message =
      `The coordinator stopped the ${stopped.gpu} kernel: its escrow of ` +
      `${sol(stopped.escrow_lamports)} is spent. Raise the session budget, then start a kernel again.`;
    Notification.error(message, {
      autoClose: false,
      data: { kernelId: stopped.kernel_id, lease: stopped.lease, reason: stopped.reason },
      actions: [
        {
          label: 'Budget settings',
          caption: stopped.advice,
          callback: () => this._onSettings()
        }
      ]
    });
  }

  private _model: GpuModel;
  private _onTopUp: (kernelId: string) => void;
  private _onSettings: () => void;
  private _shown = new Set<string>();
}

export namespace BudgetNotifier {
  export interface IOptions {
    model: GpuModel;
    /** Top up the escrow of kernel `kernelId`. */
    onTopUp: (kernelId: string) => void;
    /** Open the settings where the session budget is. */
    onSettings: () => void;
  }
}
