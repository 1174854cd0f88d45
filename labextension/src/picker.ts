import { Notification } from '@jupyterlab/apputils';
import { CommandRegistry } from '@lumino/commands';
import { Widget } from '@lumino/widgets';

import { h } from './dom';
import { duration, gigabytes, hours, shortKey, sol, solShort } from './format';
import { errorMessage } from './handler';
import { gpuIcon } from './icons';
import { Change, GpuModel } from './model';
import { IGpuType, ISession } from './types';
import { CommandIDs } from './commands';
import { escrowLeft } from './status';

/**
 * The GPU picker (left sidebar): the wallet, the user's limits, every GPU type on offer
 * (VRAM, price, availability, reliability, measured performance, simulated or not) with
 * buttons that open a notebook or console on it, and the running GPU kernels.
 */
export class GpuPicker extends Widget {
  constructor(options: GpuPicker.IOptions) {
    super();
    this._model = options.model;
    this._commands = options.commands;
    this.id = 'jupyter-io-picker';
    this.addClass('jio-Picker');
    this.title.icon = gpuIcon;
    this.title.caption = 'GPUs (jupyter-io)';
    this._model.changed.connect(this._onChange, this);
    this.node.append(
      h(
        'div',
        { class: 'jio-Picker-header' },
        h('h2', { class: 'jio-Picker-title' }, 'GPUs'),
        this._button('Refresh', 'jio-Picker-refresh jp-mod-styled', () => void this._model.refresh())
      ),
      this._walletNode,
      this._limitsNode,
      this._errorNode,
      this._listNode,
      this._sessionsNode
    );
    this._render();
  }

  dispose(): void {
    this._model.changed.disconnect(this._onChange, this);
    super.dispose();
  }

  private _onChange(_: GpuModel, change: Change): void {
    if (this.isVisible || change !== 'sessions') {
      this._render();
    }
  }

  protected onAfterShow(): void {
    void this._model.refreshOffers().catch(() => undefined);
    this._render();
  }

  private _render(): void {
    this._renderWallet();
    this._renderLimits();
    const error = this._model.offersError;
    this._errorNode.replaceChildren(...(error ? [h('div', { class: 'jio-Error' }, error)] : []));
    this._renderTypes();
    this._renderSessions();
  }

  private _renderWallet(): void {
    const wallet = this._model.wallet;
    const rows: Node[] = [];
    if (wallet?.address) {
      rows.push(
        h(
          'div',
          { class: 'jio-Wallet-line' },
          h('span', { class: 'jio-Label' }, 'Wallet '),
          h('code', { class: 'jio-Wallet-address', title: wallet.address }, shortKey(wallet.address)),
          ' ',
          h('span', { class: 'jio-Wallet-balance' }, wallet.balance ?? 'balance unknown')
        )
      );
      if (wallet.rpc_url) {
        rows.push(
          this._button('Airdrop 1 SOL', 'jio-Wallet-airdrop jp-mod-styled', () => {
            void this._commands.execute(CommandIDs.airdrop);
          })
        );
      }
    }
    const note = wallet?.note ?? this._model.walletError;
    if (note) {
      rows.push(h('div', { class: 'jio-Note' }, note));
    }
    this._walletNode.replaceChildren(...rows);
  }

  private _renderLimits(): void {
    const prefs = this._model.preferences;
    if (!prefs) {
      this._limitsNode.replaceChildren();
      return;
    }
    const parts = [
      `cap ${prefs.max_price_display ?? 'none'}`,
      `region ${prefs.region ?? 'any'}`,
      `budget ${prefs.session_budget_hours ? hours(prefs.session_budget_hours) : 'none'}`
    ];
    this._limitsNode.replaceChildren(
      h('span', { class: 'jio-Label' }, 'Limits '),
      parts.join(' · '),
      ' · ',
      h(
        'a',
        { class: 'jio-Link', href: '#', title: 'Settings → jupyter-io GPUs' },
        'change…'
      )
    );
    this._limitsNode.querySelector('a')?.addEventListener('click', event => {
      event.preventDefault();
      void this._commands.execute('settingeditor:open', { query: 'jupyter-io' });
    });
  }

  private _renderTypes(): void {
    const offers = this._model.offers;
    if (!offers) {
      this._listNode.replaceChildren(
        ...(this._model.offersError ? [] : [h('div', { class: 'jio-Note' }, 'Loading offers…')])
      );
      return;
    }
    if (offers.types.length === 0) {
      this._listNode.replaceChildren(
        h(
          'div',
          { class: 'jio-Note jio-Empty' },
          `No GPUs on offer at ${offers.coordinator_url} right now: no provider is linked. ` +
            'Start one with `jupyter io provider --coordinator URL`.'
        )
      );
      return;
    }
    // Free types first, then the cheapest: what a user most likely wants on top.
    const types = [...offers.types].sort(
      (a, b) =>
        Number(b.available > 0) - Number(a.available > 0) ||
        (a.price_min ?? Infinity) - (b.price_min ?? Infinity) ||
        a.display.localeCompare(b.display)
    );
    this._listNode.replaceChildren(...types.map(type => this._card(type)));
  }

  private _card(type: IGpuType): HTMLElement {
    const providers = type.offers;
    const free = type.available > 0;
    const price =
      type.price_min === null
        ? 'none free'
        : `from ${sol(type.price_min, '')} SOL/h` +
          (type.price_median !== null && type.price_median !== type.price_min
            ? ` (median ${sol(type.price_median, '')})`
            : '');
    const card = h(
      'div',
      {
        class: 'jio-GpuCard' + (free ? '' : ' jio-mod-unavailable'),
        'data-gpu': type.gpu,
        'data-kernel-name': type.kernel_name ?? undefined
      },
      h(
        'div',
        { class: 'jio-GpuCard-head' },
        h('span', { class: 'jio-GpuCard-name' }, type.display),
        type.gpu.startsWith('cpu') ? null : h('span', { class: 'jio-GpuCard-vram' }, gigabytes(type.vram_bytes)),
        type.simulated
          ? h(
              'span',
              {
                class: 'jio-Badge jio-Badge-simulated',
                title: 'A simulated GPU: the kernel runs on the provider’s CPU. For trying things out.'
              },
              'simulated'
            )
          : null
      ),
      h('div', { class: 'jio-GpuCard-price' }, price),
      h(
        'div',
        { class: 'jio-GpuCard-facts' },
        h('span', { class: 'jio-GpuCard-availability' }, `${type.available}/${type.total} free`),
        ' · ',
        h(
          'span',
          { class: 'jio-GpuCard-reliability', title: 'Uptime and finished sessions of its providers' },
          `reliability ${Math.round(type.reliability * 100)}%`
        ),
        ' · ',
        h(
          'span',
          { class: 'jio-GpuCard-perf', title: 'Measured by the provider host (matmul benchmark)' },
          type.benchmark_tflops === null ? 'not measured' : `${type.benchmark_tflops.toFixed(1)} TFLOPS`
        ),
        ' · ',
        `${providers} provider${providers === 1 ? '' : 's'}`,
        type.regions.length ? ` · ${type.regions.join(', ')}` : ''
      ),
      type.within_cap
        ? null
        : h('div', { class: 'jio-Note jio-GpuCard-overcap' }, 'Above your price cap: change it in Limits to lease this type.')
    );
    const actions = h('div', { class: 'jio-GpuCard-actions' });
    const kernelName = type.kernel_name;
    const disabled = !kernelName || !free;
    const notebook = this._button('Notebook', 'jio-GpuCard-notebook jp-mod-styled jp-mod-accept', () => {
      void this._commands.execute(CommandIDs.newNotebook, { kernelName });
    });
    const console = this._button('Console', 'jio-GpuCard-console jp-mod-styled', () => {
      void this._commands.execute(CommandIDs.newConsole, { kernelName });
    });
    for (const button of [notebook, console]) {
      button.disabled = disabled;
      button.title = kernelName
        ? free
          ? `Start a kernel on ${type.display} (kernelspec ${kernelName})`
          : `Every ${type.display} is taken right now`
        : 'GPU kernelspecs are off on this server (see its log)';
    }
    actions.append(notebook, console);
    card.append(actions);
    return card;
  }

  private _renderSessions(): void {
    const sessions = this._model.sessions;
    if (sessions.length === 0) {
      this._sessionsNode.replaceChildren();
      return;
    }
    this._sessionsNode.replaceChildren(
      h('h3', { class: 'jio-Picker-subtitle' }, 'Running GPU kernels'),
      ...sessions.map(s => this._sessionRow(s))
    );
  }

  private _sessionRow(session: ISession): HTMLElement {
    const elapsed = session.elapsed_seconds ?? 0;
    const gpu = h('span', { class: 'jio-Session-gpu' }, session.gpu ?? 'direct provider');
    if (session.state !== 'running') {
      const what = session.state === 'starting' ? 'starting…' : `stopped (${session.end_reason ?? 'lease ended'})`;
      return h('div', { class: 'jio-Session', 'data-kernel-id': session.kernel_id }, gpu, ` · ${what}`);
    }
    const left = escrowLeft(this._model, session);
    return h(
      'div',
      { class: 'jio-Session', 'data-kernel-id': session.kernel_id },
      gpu,
      ` · ${duration(elapsed)} · `,
      h('span', { class: 'jio-Session-cost' }, solShort(session.cost_lamports)),
      session.price_lamports_per_hour !== null
        ? ` at ${sol(session.price_lamports_per_hour, '')} SOL/h`
        : '',
      left !== null
        ? h(
            'span',
            { class: 'jio-Session-escrow', title: `Escrow ${session.escrow}: deposit ${sol(session.escrow_lamports)}` },
            ` · escrow left ${solShort(left)}`
          )
        : ''
    );
  }

  private _button(label: string, className: string, onClick: () => void): HTMLButtonElement {
    const button = h('button', { class: `jp-Button jio-Button ${className}`, type: 'button' }, label);
    button.addEventListener('click', onClick);
    return button;
  }

  private _model: GpuModel;
  private _commands: CommandRegistry;
  private _walletNode = h('div', { class: 'jio-Wallet' });
  private _limitsNode = h('div', { class: 'jio-Limits' });
  private _errorNode = h('div', { class: 'jio-Picker-error' });
  private _listNode = h('div', { class: 'jio-GpuList' });
  private _sessionsNode = h('div', { class: 'jio-Sessions' });
}

export namespace GpuPicker {
  export interface IOptions {
    model: GpuModel;
    commands: CommandRegistry;
  }
}

/** Show an error the way the rest of the extension does. */
export function notifyError(prefix: string, error: unknown): void {
  Notification.error(`${prefix}: ${errorMessage(error)}`, { autoClose: false });
}
