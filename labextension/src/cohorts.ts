import { Notification } from '@jupyterlab/apputils';
import { CommandRegistry } from '@lumino/commands';
import { Poll } from '@lumino/polling';
import { ISignal, Signal } from '@lumino/signaling';

import { CommandIDs } from './commands';
import { h, keyedNodes, placeChildren, setAttr, setText, show } from './dom';
import { errorMessage, requestAPI } from './handler';
import { GpuModel } from './model';
import { ICohort, ICohortGpu, ICohorts } from './types';

/** The classes change seldom (a join, a week's usage): every 10 s is enough, and a join or
 * a kernel's start fetches at once; a user in no class is asked every minute (a join made
 * here fetches at once). Paused while the page is hidden. */
const COHORTS_INTERVAL = 10_000;
const NO_COHORTS_INTERVAL = 60_000;

/** `7.5`, `10`, `0.25`: GPU-hours for people, at most two decimals. */
export function gpuHours(seconds: number): string {
  return String(Number((Math.max(0, seconds) / 3600).toFixed(2)));
}

/** `CS229: 7.5 of 10 GPU-h left this week` for a student's cohort. */
export function quotaText(cohort: ICohort): string {
  const quota = cohort.quota_gpu_seconds_per_week;
  if (!cohort.me) {
    return `${cohort.name}: ${gpuHours(quota)} GPU-h a week`;
  }
  const left = Math.min(quota, cohort.me.quota_left_gpu_seconds);
  return `${cohort.name}: ${gpuHours(left)} of ${gpuHours(quota)} GPU-h left this week`;
}

/** Whether `role` may see the cohort's dashboard. */
export function teaches(cohort: ICohort): boolean {
  return cohort.role === 'instructor' || cohort.role === 'co_instructor';
}

/**
 * The user's classes, polled from the server extension (`GET cohorts`): those they teach and
 * those they study in (with their week's quota and the cohort's GPU types, each with the
 * kernelspec that starts a kernel paid by the class).
 */
export class CohortModel {
  constructor(gpus: GpuModel) {
    this._poll = new Poll({
      factory: () => this._fetch(),
      frequency: { interval: COHORTS_INTERVAL, backoff: true, max: 60_000 },
      name: 'jupyter-io:cohorts',
      standby: 'when-hidden'
    });
    // A kernel's start or end moves the week's usage and what is free.
    gpus.changed.connect((_, change) => {
      if (change === 'offers' || change === 'launches') {
        this._drawOnly();
      }
    });
  }

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  get cohorts(): ICohort[] {
    return this._cohorts;
  }

  /** Why the last fetch failed (null after a good one, or before the first). */
  get error(): string | null {
    return this._error;
  }

  /** Whether the first answer came. */
  get loaded(): boolean {
    return this._loaded;
  }

  cohort(id: string): ICohort | null {
    return this._cohorts.find(c => c.id === id) ?? null;
  }

  async refresh(): Promise<void> {
    await this._poll.refresh();
    await this._poll.tick;
  }

  /** Join a class with a code or a `jupyter-io:join?...` link; rejects with the reason. */
  async join(code: string): Promise<ICohort> {
    const body = await requestAPI<{ cohort: ICohort; role: string }>('cohorts/join', {
      method: 'POST',
      body: JSON.stringify({ code })
    });
    await this.refresh();
    return this.cohort(body.cohort.id) ?? body.cohort;
  }

  dispose(): void {
    this._poll.dispose();
    Signal.clearData(this);
  }

  private _drawOnly(): void {
    this._changed.emit();
  }

  private async _fetch(): Promise<void> {
    try {
      const body = await requestAPI<ICohorts>('cohorts');
      this._cohorts = body.cohorts;
      this._error = null;
      const interval = this._cohorts.length ? COHORTS_INTERVAL : NO_COHORTS_INTERVAL;
      if (this._poll.frequency.interval !== interval) {
        this._poll.frequency = { interval, backoff: true, max: 60_000 };
      }
    } catch (error) {
      // 501: this installation has no cohorts at all; nothing to report in the picker.
      const status = (error as { response?: Response }).response?.status;
      this._error = status === 501 ? null : errorMessage(error);
      this._loaded = true;
      this._changed.emit();
      throw error; // back off
    }
    this._loaded = true;
    this._changed.emit();
  }

  private _cohorts: ICohort[] = [];
  private _error: string | null = null;
  private _loaded = false;
  private _changed = new Signal<this, void>(this);
  private _poll: Poll;
}

/** One GPU type of a student's class: name, what is free, buttons paid by the class. */
class CohortGpuRow {
  constructor(commands: CommandRegistry, cohortId: string, gpu: string) {
    this.node = h('div', { class: 'jio-CohortGpu', 'data-gpu': gpu, 'data-cohort': cohortId });
    const button = (label: string, className: string, command: string, args: () => any) => {
      const el = h('button', { class: `jp-Button jio-Button jp-mod-styled ${className}`, type: 'button' }, label);
      el.addEventListener('click', () => void commands.execute(command, args()));
      return el;
    };
    this.notebook = button('Notebook', 'jio-CohortGpu-notebook jp-mod-accept', CommandIDs.newNotebook,
      () => ({ kernelName: this._kernelName }));
    this.console = button('Console', 'jio-CohortGpu-console', CommandIDs.newConsole,
      () => ({ kernelName: this._kernelName }));
    this.node.append(
      h('div', { class: 'jio-CohortGpu-head' }, this._name, ' ', this._free),
      h('div', { class: 'jio-GpuCard-actions' }, this.notebook, this.console)
    );
  }

  update(gpu: ICohortGpu, cohort: ICohort): void {
    this._kernelName = gpu.kernel_name;
    setAttr(this.node, 'data-kernel-name', gpu.kernel_name);
    setText(this._name, gpu.display + (gpu.simulated ? ' (simulated)' : ''));
    const free = gpu.available > 0;
    setText(
      this._free,
      gpu.offered ? (free ? `${gpu.available}/${gpu.total} free` : 'all busy: you will queue') : 'not offered now'
    );
    this._free.classList.toggle('jio-mod-busy', !free);
    const quotaLeft = cohort.me ? cohort.me.quota_left_gpu_seconds > 0 : true;
    const disabled = !gpu.offered || !quotaLeft || cohort.state !== 'active';
    const title = !quotaLeft
      ? `Your ${gpuHours(cohort.quota_gpu_seconds_per_week)} GPU-h of this week are used up; ` +
        'they come back on Monday (UTC)'
      : !gpu.offered
        ? `No provider offers ${gpu.display} right now`
        : free
          ? `Start a kernel on ${gpu.display}, paid by ${cohort.name}`
          : `Every ${gpu.display} is busy: starting puts you in ${cohort.name}'s queue`;
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
  private _kernelName = '';
  private _name = h('span', { class: 'jio-CohortGpu-name' });
  private _free = h('span', { class: 'jio-CohortGpu-free' });
}

/** One class in the picker: a student's with quota and GPUs, a teacher's with its dashboard. */
class CohortCard {
  constructor(private _commands: CommandRegistry, cohortId: string) {
    this.node = h('div', { class: 'jio-Cohort', 'data-cohort': cohortId });
    this._dashboard.addEventListener(
      'click',
      () => void this._commands.execute(CommandIDs.openDashboard, { cohortId })
    );
    this.node.append(
      h('div', { class: 'jio-Cohort-head' }, this._quota, this._role),
      this._facts,
      this._gpuList,
      this._dashboard
    );
  }

  update(cohort: ICohort): void {
    const student = cohort.role === 'student';
    setAttr(this.node, 'data-role', cohort.role);
    setText(this._quota, student ? quotaText(cohort) : cohort.name);
    setText(this._role, student ? 'paid by the class' : cohort.role === 'instructor' ? 'you teach' : 'you co-teach');
    const facts: string[] = [];
    if (cohort.state !== 'active') {
      facts.push('the term has ended');
    } else if (student) {
      const live = cohort.me?.live_kernels ?? 0;
      facts.push(`${live} of ${cohort.max_concurrent_per_student} kernels running`);
      facts.push(`idle stop after ${Math.round(cohort.idle_timeout_seconds / 60)} min`);
      if (cohort.me?.queued) {
        facts.push('in the queue');
      }
    } else {
      facts.push(`${cohort.students} student${cohort.students === 1 ? '' : 's'}`);
      facts.push(`${gpuHours(cohort.quota_gpu_seconds_per_week)} GPU-h a week each`);
    }
    setText(this._facts, facts.join(' · '));
    show(this._dashboard, !student);
    show(this._gpuList, student);
    const nodes = keyedNodes(
      this._rows,
      cohort.gpus ?? [],
      gpu => gpu.gpu,
      gpu => new CohortGpuRow(this._commands, cohort.id, gpu.gpu),
      (row, gpu) => row.update(gpu, cohort)
    );
    placeChildren(this._gpuList, nodes);
  }

  readonly node: HTMLDivElement;
  private _rows = new Map<string, CohortGpuRow>();
  private _quota = h('span', { class: 'jio-Cohort-quota' });
  private _role = h('span', { class: 'jio-Badge jio-Cohort-role' });
  private _facts = h('div', { class: 'jio-Cohort-facts' });
  private _gpuList = h('div', { class: 'jio-Cohort-gpus' });
  private _dashboard = h(
    'button',
    { class: 'jp-Button jio-Button jp-mod-styled jio-Cohort-dashboard', type: 'button' },
    'Open dashboard'
  );
}

/**
 * The picker's "Classes" section: a "Join a class" button, then each class of the user's,
 * updated in place from the {@link CohortModel}.
 */
export class CohortSection {
  constructor(model: CohortModel, commands: CommandRegistry) {
    this._model = model;
    this._commands = commands;
    this._join.addEventListener('click', () => void commands.execute(CommandIDs.joinCohort));
    this.node.append(
      h('div', { class: 'jio-Cohorts-header' }, h('h3', { class: 'jio-Picker-subtitle' }, 'Classes'), this._join),
      this._error,
      this._list
    );
    model.changed.connect(this.render, this);
    this.render();
  }

  render(): void {
    const error = this._model.error;
    show(this._error, !!error);
    setText(this._error, error ? `Classes: ${error}` : '');
    const nodes = keyedNodes(
      this._cards,
      this._model.cohorts,
      cohort => cohort.id,
      cohort => new CohortCard(this._commands, cohort.id),
      (card, cohort) => card.update(cohort)
    );
    placeChildren(this._list, nodes);
  }

  dispose(): void {
    this._model.changed.disconnect(this.render, this);
  }

  readonly node = h('div', { class: 'jio-Cohorts' });
  private _model: CohortModel;
  private _commands: CommandRegistry;
  private _cards = new Map<string, CohortCard>();
  private _join = h(
    'button',
    { class: 'jp-Button jio-Button jp-mod-styled jio-Cohorts-join', type: 'button' },
    'Join a class'
  );
  private _error = h('div', { class: 'jio-Error jio-Cohorts-error' });
  private _list = h('div', { class: 'jio-Cohorts-list' });
}

/**
 * Idle, max-length and quota warnings of the running kernels (`sessions` rows' `warnings`,
 * set by the coordinator a minute or so before it stops a class's kernel), each shown once
 * as a notification that stays until dismissed or the kernel is gone.
 */
export class WarningNotifier {
  constructor(model: GpuModel) {
    this._model = model;
    model.changed.connect((_, change) => {
      if (change === 'sessions') {
        this._update();
      }
    });
  }

  private _update(): void {
    const live = new Set<string>();
    for (const session of this._model.sessions) {
      for (const warning of session.warnings ?? []) {
        const key = `${session.lease ?? session.kernel_id}:${warning.kind}:${warning.at}`;
        live.add(key);
        if (this._shown.has(key)) {
          continue;
        }
        const id = Notification.warning(`${session.gpu ?? 'GPU'} kernel: ${warning.message}`, {
          autoClose: false,
          data: { kernelId: session.kernel_id, kind: warning.kind }
        });
        this._shown.set(key, id);
      }
    }
    for (const [key, id] of [...this._shown]) {
      if (!live.has(key)) {
        Notification.dismiss(id);
        this._shown.delete(key);
      }
    }
  }

  private _model: GpuModel;
  private _shown = new Map<string, string>();
}

/** `Joined CS229: ...` or the reason it failed, as notifications. */
export async function joinWithCode(model: CohortModel, code: string): Promise<ICohort | null> {
  try {
    const cohort = await model.join(code);
    // "Joined CS229: 10 of 10 GPU-h left this week. Its GPUs are in the picker."
    Notification.success(`Joined ${quotaText(cohort)}. Its GPUs are in the GPU picker.`, { autoClose: 6000 });
    return cohort;
  } catch (error) {
    Notification.error(`Not joined: ${errorMessage(error)}`, { autoClose: false });
    return null;
  }
}
