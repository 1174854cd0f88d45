import { Notification } from '@jupyterlab/apputils';
import { CommandRegistry } from '@lumino/commands';
import { Widget } from '@lumino/widgets';

import { h, keyedNodes, placeChildren, setAttr, setText, show } from './dom';
import { duration, gigabytes, hours, shortKey, sol, solShort } from './format';
import { errorMessage } from './handler';
import { gpuIcon } from './icons';
import { Change, GpuModel } from './model';
import { IGpuType, ISession } from './types';
import { CommandIDs } from './commands';
import { CohortModel, CohortSection } from './cohorts';
import { latencyText, latencyTitle, ms } from './latency';

/** `0.12 SOL/h` for one price, `from 0.12 SOL/h (median 0.2)` for a range. */
export function priceText(type: IGpuType): string {
  if (type.price_min === null) {
    return 'none free';
  }
  const top = type.price_max ?? type.price_median;
  if (top === null || top === undefined || top <= type.price_min) {
    return `${sol(type.price_min, '')} SOL/h`;
  }
  const median =
    type.price_median !== null && type.price_median !== type.price_min
      ? ` (median ${sol(type.price_median, '')})`
      : '';
  return `from ${sol(type.price_min, '')} SOL/h${median}`;
}

/**
 * One GPU type's card. Built once per type and updated in place on every fetch: its
 * buttons keep their identity, so a click is never lost to a redraw.
 */
class GpuCard {
  constructor(gpu: string, commands: CommandRegistry) {
    this.node = h('div', { class: 'jio-GpuCard', 'data-gpu': gpu });
    const button = (label: string, className: string, command: string, args: () => any) => {
      const el = h('button', { class: `jp-Button jio-Button ${className}`, type: 'button' }, label);
      el.addEventListener('click', () => void commands.execute(command, args()));
      return el;
    };
    this.notebook = button('Notebook', 'jio-GpuCard-notebook jp-mod-styled jp-mod-accept',
      CommandIDs.newNotebook, () => ({ kernelName: this._kernelName }));
    this.console = button('Console', 'jio-GpuCard-console jp-mod-styled',
      CommandIDs.newConsole, () => ({ kernelName: this._kernelName }));
    this.node.append(
      h('div', { class: 'jio-GpuCard-head' }, this._name, this._vram, this._badge),
      this._price,
      h(
        'div',
        { class: 'jio-GpuCard-facts' },
        this._availability,
        ' · ',
        this._reliability,
        ' · ',
        this._perf,
        ' · ',
        this._providers,
        ' · ',
        this._latency
      ),
      this._overcap,
      h('div', { class: 'jio-GpuCard-actions' }, this.notebook, this.console)
    );
  }

  update(type: IGpuType): void {
    const free = type.available > 0;
    this._kernelName = type.kernel_name;
    this.node.classList.toggle('jio-mod-unavailable', !free);
    setAttr(this.node, 'data-kernel-name', type.kernel_name);
    setText(this._name, type.display);
    show(this._vram, !type.gpu.startsWith('cpu'));
    setText(this._vram, gigabytes(type.vram_bytes));
    show(this._badge, type.simulated);
    setText(this._price, priceText(type));
    setText(this._availability, `${type.available}/${type.total} free`);
    setText(
      this._reliability,
      type.reliability === null
        ? 'reliability not measured'
        : `reliability ${Math.round(type.reliability * 100)}%`
    );
    setText(
      this._perf,
      type.benchmark_tflops === null ? 'not measured' : `${type.benchmark_tflops.toFixed(1)} TFLOPS`
    );
    const providers = `${type.offers} provider${type.offers === 1 ? '' : 's'}`;
    setText(this._providers, providers + (type.regions.length ? ` · ${type.regions.join(', ')}` : ''));
    setText(this._latency, latencyText(type));
    setAttr(this._latency, 'title', latencyTitle(type));
    const measured = type.latency_ms !== null && type.latency_ms !== undefined;
    this._latency.classList.toggle('jio-mod-pending', !measured);
    show(this._overcap, !type.within_cap);
    const disabled = !type.kernel_name || !free;
    const title = type.kernel_name
      ? free
        ? `Start a kernel on ${type.display} (kernelspec ${type.kernel_name})`
        : `Every ${type.display} is taken right now`
      : 'GPU kernelspecs are off on this server (see its log)';
    for (const button of [this.notebook, this.console]) {
      if (button.disabled !== disabled) {
        button.disabled = disabled;
      }
      setAttr(button, 'title', title);
    }
  }

  readonly node: HTMLDivElement;
  readonly notebook: HTMLButtonElement;
  readonly console: HTMLButtonElement;
  private _kernelName: string | null = null;
  private _name = h('span', { class: 'jio-GpuCard-name' });
  private _vram = h('span', { class: 'jio-GpuCard-vram' });
  private _badge = h(
    'span',
    {
      class: 'jio-Badge jio-Badge-simulated',
      title: 'A simulated GPU: the kernel runs on the provider’s CPU. For trying things out.'
    },
    'simulated'
  );
  private _price = h('div', { class: 'jio-GpuCard-price' });
  private _availability = h('span', { class: 'jio-GpuCard-availability' });
  private _reliability = h('span', {
    class: 'jio-GpuCard-reliability',
    title:
      'Its measured providers over 30 days: sessions completed × uptime. ' +
      'Not measured: no provider of this type has a record yet (new keys start unmeasured).'
  });
  private _perf = h('span', {
    class: 'jio-GpuCard-perf',
    title: 'Measured by the provider host (matmul benchmark)'
  });
  private _providers = h('span', { class: 'jio-GpuCard-providers' });
  private _latency = h('span', { class: 'jio-GpuCard-latency' });
  private _overcap = h(
    'div',
    { class: 'jio-Note jio-GpuCard-overcap' },
    'Above your price cap: change it in Limits to lease this type.'
  );
}

/** One running (or starting, or stopped) kernel's row, updated in place each second. */
class SessionRow {
  constructor(kernelId: string) {
    this.node = h(
      'div',
      { class: 'jio-Session', 'data-kernel-id': kernelId },
      this._gpu,
      this._state,
      this._cost,
      this._price,
      this._escrow
    );
  }

  update(session: ISession, model: GpuModel): void {
    setText(this._gpu, session.gpu ?? 'direct provider');
    const running = session.state === 'running';
    show(this._cost, running);
    show(this._price, running && session.price_lamports_per_hour !== null);
    if (!running) {
      const what =
        session.state === 'starting' ? 'starting…' : `stopped (${session.end_reason ?? 'lease ended'})`;
      setText(this._state, ` · ${what}`);
      show(this._escrow, false);
      return;
    }
    const { elapsed, cost, deposit, left } = model.figures(session);
    setText(this._state, ` · ${duration(elapsed ?? 0)} · `);
    setText(this._cost, solShort(cost));
    setText(this._price, ` at ${sol(session.price_lamports_per_hour, '')} SOL/h`);
    show(this._escrow, left !== null);
    setText(this._escrow, ` · escrow left ${solShort(left)}`);
    setAttr(this._escrow, 'title', `Escrow ${session.escrow}: deposit ${sol(deposit)}`);
  }

  readonly node: HTMLDivElement;
  private _gpu = h('span', { class: 'jio-Session-gpu' });
  private _state = h('span', { class: 'jio-Session-state' });
  private _cost = h('span', { class: 'jio-Session-cost' });
  private _price = h('span', { class: 'jio-Session-price' });
  private _escrow = h('span', { class: 'jio-Session-escrow' });
}

/**
 * The GPU picker (left sidebar): the wallet, the user's limits, every GPU type on offer
 * (VRAM, price, availability, reliability, measured performance, simulated or not) with
 * buttons that open a notebook or console on it, and the running GPU kernels. Every part
 * is updated in place from the model (cards and rows keyed by GPU type and kernel id).
 */
export class GpuPicker extends Widget {
  constructor(options: GpuPicker.IOptions) {
    super();
    this._model = options.model;
    this._commands = options.commands;
    this._cohorts = new CohortSection(options.cohorts, options.commands);
    this.id = 'jupyter-io-picker';
    this.addClass('jio-Picker');
    this.title.icon = gpuIcon;
    this.title.caption = 'GPUs (jupyter-io)';
    this._model.changed.connect(this._onChange, this);
    this._airdrop.addEventListener('click', () => void this._commands.execute(CommandIDs.airdrop));
    this._limitsLink.addEventListener('click', event => {
      event.preventDefault();
      void this._commands.execute('settingeditor:open', { query: 'jupyter-io' });
    });
    this._walletNode.append(this._walletLine, this._airdrop, this._walletNote);
    this._limitsNode.append(
      h('span', { class: 'jio-Label' }, 'Limits '),
      this._limitsText,
      ' · ',
      this._limitsLink
    );
    this._sessionsNode.append(
      h('h3', { class: 'jio-Picker-subtitle' }, 'Running GPU kernels'),
      this._sessionList
    );
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
      this._cohorts.node,
      this._listNote,
      this._listNode,
      this._sessionsNode
    );
    this._render();
  }

  dispose(): void {
    this._model.changed.disconnect(this._onChange, this);
    this._cohorts.dispose();
    super.dispose();
  }

  private _onChange(_: GpuModel, change: Change): void {
    if (change === 'tick' || change === 'sessions') {
      if (this.isVisible) {
        this._renderSessions();
      }
      return;
    }
    this._render();
  }

  protected onAfterShow(): void {
    void this._model.refreshOffers().catch(() => undefined);
    this._cohorts.render();
    this._render();
  }

  private _render(): void {
    this._renderWallet();
    this._renderLimits();
    const error = this._model.offersError;
    show(this._errorNode, !!error);
    setText(this._errorNode, error ?? '');
    this._renderTypes();
    this._renderSessions();
  }

  private _renderWallet(): void {
    const wallet = this._model.wallet;
    show(this._walletLine, !!wallet?.address);
    show(this._airdrop, !!wallet?.address && !!wallet.rpc_url);
    if (wallet?.address) {
      setText(this._walletAddress, shortKey(wallet.address));
      setAttr(this._walletAddress, 'title', wallet.address);
      setText(this._walletBalance, wallet.balance ?? 'balance unknown');
    }
    const note = wallet?.note ?? this._model.walletError;
    show(this._walletNote, !!note);
    setText(this._walletNote, note ?? '');
  }

  private _renderLimits(): void {
    const prefs = this._model.preferences;
    show(this._limitsNode, !!prefs);
    if (!prefs) {
      return;
    }
    const parts = [
      `cap ${prefs.max_price_display ?? 'none'}`,
      `region ${prefs.region ?? 'any'}`,
      `latency ${prefs.max_latency_ms ? `≤ ${ms(prefs.max_latency_ms)}` : 'any'}`,
      `reliability ${prefs.min_reliability ? `≥ ${Math.round(prefs.min_reliability * 100)}%` : 'any'}`,
      `budget ${prefs.session_budget_hours ? hours(prefs.session_budget_hours) : 'none'}`
    ];
    setText(this._limitsText, parts.join(' · '));
  }

  private _renderTypes(): void {
    const offers = this._model.offers;
    let note = '';
    let types: IGpuType[] = [];
    if (!offers) {
      note = this._model.offersError ? '' : 'Loading offers…';
    } else if (offers.types.length === 0) {
      note =
        `No GPUs on offer at ${offers.coordinator_url} right now: no provider is linked. ` +
        'Start one with `jupyter io provider --coordinator URL`.';
    } else {
      // Free types first, then the cheapest: what a user most likely wants on top.
      types = [...offers.types].sort(
        (a, b) =>
          Number(b.available > 0) - Number(a.available > 0) ||
          (a.price_min ?? Infinity) - (b.price_min ?? Infinity) ||
          a.display.localeCompare(b.display)
      );
    }
    show(this._listNote, !!note);
    setText(this._listNote, note);
    this._listNote.classList.toggle('jio-Empty', !!offers && offers.types.length === 0);
    const nodes = keyedNodes(
      this._cards,
      types,
      type => type.gpu,
      type => new GpuCard(type.gpu, this._commands),
      (card, type) => card.update(type)
    );
    placeChildren(this._listNode, nodes);
  }

  private _renderSessions(): void {
    const sessions = this._model.sessions;
    show(this._sessionsNode, sessions.length > 0);
    const nodes = keyedNodes(
      this._rows,
      sessions,
      session => session.kernel_id,
      session => new SessionRow(session.kernel_id),
      (row, session) => row.update(session, this._model)
    );
    placeChildren(this._sessionList, nodes);
  }

  private _button(label: string, className: string, onClick: () => void): HTMLButtonElement {
    const button = h('button', { class: `jp-Button jio-Button ${className}`, type: 'button' }, label);
    button.addEventListener('click', onClick);
    return button;
  }

  private _model: GpuModel;
  private _commands: CommandRegistry;
  /** The user's classes: "Join a class", a student's GPUs paid by the class. */
  private _cohorts: CohortSection;
  private _cards = new Map<string, GpuCard>();
  private _rows = new Map<string, SessionRow>();
  private _walletAddress = h('code', { class: 'jio-Wallet-address' });
  private _walletBalance = h('span', { class: 'jio-Wallet-balance' });
  private _walletLine = h(
    'div',
    { class: 'jio-Wallet-line' },
    h('span', { class: 'jio-Label' }, 'Wallet '),
    this._walletAddress,
    ' ',
    this._walletBalance
  );
  private _airdrop = h(
    'button',
    { class: 'jp-Button jio-Button jio-Wallet-airdrop jp-mod-styled', type: 'button' },
    'Airdrop 1 SOL'
  );
  private _walletNote = h('div', { class: 'jio-Note' });
  private _walletNode = h('div', { class: 'jio-Wallet' });
  private _limitsText = h('span', { class: 'jio-Limits-text' });
  private _limitsLink = h(
    'a',
    { class: 'jio-Link', href: '#', title: 'Settings → jupyter-io GPUs' },
    'change…'
  );
  private _limitsNode = h('div', { class: 'jio-Limits' });
  private _errorNode = h('div', { class: 'jio-Error' });
  private _listNote = h('div', { class: 'jio-Note' });
  private _listNode = h('div', { class: 'jio-GpuList' });
  private _sessionList = h('div', { class: 'jio-Sessions-list' });
  private _sessionsNode = h('div', { class: 'jio-Sessions' });
}

export namespace GpuPicker {
  export interface IOptions {
    model: GpuModel;
    commands: CommandRegistry;
    cohorts: CohortModel;
  }
}

/** Show an error the way the rest of the extension does. */
export function notifyError(prefix: string, error: unknown): void {
  Notification.error(`${prefix}: ${errorMessage(error)}`, { autoClose: false });
}
