import { Notification } from '@jupyterlab/apputils';
import { CommandRegistry } from '@lumino/commands';

import { CommandIDs } from './commands';

import { sol } from './format';
import { GpuModel } from './model';
import { ILaunch } from './types';

/**
 * The steps a user sees, and the provisioner steps each one covers. An optional stage is
 * shown only on a start that takes it: `environment` when the provider first builds a
 * class's course environment (kernel_provisioner/progress.py), which most starts skip.
 */
const STAGES: { label: string; steps: string[]; optional?: boolean }[] = [
  { label: 'leasing', steps: ['queued', 'queue', 'leased'] },
  { label: 'escrow', steps: ['escrowed'] },
  { label: 'launching', steps: ['launching'] },
  { label: 'environment', steps: ['environment'], optional: true },
  { label: 'ready', steps: ['ready'] }
];

/** `escrow needs 0.006 SOL (...), wallet 7xK… holds 0 SOL` → the two amounts. */
const SHORT_OF = /needs ([\d.]+ SOL)\b.*\bholds ([\d.]+ SOL)/;

/** What to do about a failed start, by what the message says ('' when it says it). */
function advice(message: string): string {
  const text = message.toLowerCase();
  if (text.includes('budget of lease') && text.includes('ran out')) {
    return 'Raise the session budget in Settings, then start a kernel again.';
  }
  if (SHORT_OF.test(message) || text.includes('insufficient') || text.includes('fund')) {
    return 'Airdrop (local ledger) or fund the wallet, then retry.';
  }
  if (text.includes('quota')) {
    return 'The class’s GPU-hours of this week are used up: they come back on Monday (UTC), or ask your instructor.';
  }
  if (text.includes('not a member') || text.includes('removed from the cohort')) {
    return 'Join the class again with a code from your instructor.';
  }
  if (text.includes('above your cap')) {
    return 'Raise the cap in GPU picker → Limits.';
  }
  if (text.includes('cannot reach') || text.includes('cannot lease')) {
    return 'Check that the coordinator runs, then retry.';
  }
  if (text.includes('no offer') || text.includes('on offer')) {
    return 'Pick a GPU type that is free in the GPU picker.';
  }
  return '';
}

/**
 * A failure for a toast (Lab shows 140 characters of it): the reason without the
 * coordinator's URL, and without the server-side setting it names when there is advice
 * for Lab users instead.
 */
export function failureText(name: string, message: string): string {
  let reason = message.replace(/^(no lease from|cannot lease from the coordinator at) \S+: /, '');
  const todo = advice(reason);
  const short = SHORT_OF.exec(reason);
  if (short) {
    // Insufficient funds: what is needed and what the wallet holds, without the key.
    return `${name} kernel failed: the escrow needs ${short[1]}, the wallet holds ${short[2]}. ${todo}`;
  }
  if (todo && /budget of lease/.test(reason)) {
    return `${name} kernel not restarted: its escrow is spent (budget exhausted). ${todo}`;
  }
  if (todo) {
    reason = reason.split(';')[0];
  }
  reason = reason.replace(/\.$/, '');
  return `${name} kernel failed: ${reason}.${todo ? ' ' + todo : ''}`;
}

/** `leasing ✓ · escrow – · launching … · ready` for a start in progress. */
export function stepLine(launch: ILaunch): string {
  const seen = new Set(launch.events.map(e => e.step));
  const current = launch.step;
  const stages = STAGES.filter(
    stage => !stage.optional || stage.steps.includes(current) || stage.steps.some(step => seen.has(step))
  );
  const currentStage = stages.findIndex(stage => stage.steps.includes(current));
  return stages.map((stage, index) => {
    let mark: string;
    if (stage.steps.some(step => seen.has(step)) && index < currentStage) {
      mark = '✓';
    } else if (index === currentStage) {
      mark = launch.state === 'ready' ? '✓' : '…';
    } else if (index < currentStage) {
      mark = '(n/a)'; // a step this start did not take (no escrow yet)
    } else {
      mark = '';
    }
    return mark ? `${stage.label} ${mark}` : stage.label;
  }).join(' · ');
}

/**
 * `place 3 of 12, about 4 min` while a class's start waits for a GPU (the provisioner's
 * `queue` step: `place`, `waiting`, `estimated_wait_seconds`, see
 * jupyter_io/queue_tickets.py); null when the start is not waiting in a queue now.
 */
export function queueText(launch: ILaunch): string | null {
  if (launch.step !== 'queue') {
    return null;
  }
  const event = [...launch.events].reverse().find(e => e.step === 'queue');
  const place = event?.place;
  const waiting = event?.waiting;
  const wait = event?.estimated_wait_seconds;
  if (typeof place !== 'number') {
    return launch.message;
  }
  const of = typeof waiting === 'number' && waiting >= place ? ` of ${waiting}` : '';
  const about =
    typeof wait !== 'number' ? '' : wait < 60 ? ', less than a minute' : `, about ${Math.ceil(wait / 60)} min`;
  return `place ${place}${of}${about}`;
}

/**
 * What the provider says of a class's course environment while the start waits on it
 * (`building the course environment 3f2a9c01b2d4 (pip install -r; up to 600 s)`, then `course
 * environment 3f2a9c01b2d4 ready (41.2 s)` until the kernel runs); null at any other step.
 */
export function environmentText(launch: ILaunch): string | null {
  if (launch.step !== 'environment' || launch.state !== 'starting') {
    return null;
  }
  const event = [...launch.events].reverse().find(e => e.step === 'environment');
  return event?.message || launch.message || 'building the course environment';
}

/** The GPU's name for people (the queued step knows only the key asked for). */
function gpuName(model: GpuModel, launch: ILaunch): string | null {
  const gpu = launch.gpu;
  if (!gpu) {
    return null;
  }
  const type = model.offers?.types.find(t => t.gpu === gpu || t.display === gpu);
  return type ? type.display : gpu;
}

/** The one-line title of a start: `GPU kernel on RTX 4090 at 0.12 SOL/h`. */
function title(model: GpuModel, launch: ILaunch): string {
  const name = gpuName(model, launch);
  const where = name ? ` on ${name}` : '';
  const price =
    typeof launch.price_lamports_per_hour === 'number'
      ? ` at ${sol(launch.price_lamports_per_hour, '')} SOL/h`
      : '';
  return `GPU kernel${where}${price}`;
}

/** A variable a failover did not restore, and the cell that made it (the state journal's). */
export interface IMissingVariable {
  name: string;
  cell?: number | null;
  source?: string;
  why?: string;
}

/** The facts of a finished failover (the `failover` step of phase `done`), or null. */
export function failoverFacts(
  launch: ILaunch
): { old: string; new: string; restored: string[]; missing: IMissingVariable[]; journal: string } | null {
  const event = [...launch.events].reverse().find(e => e.step === 'failover' && e.phase === 'done');
  if (!event) {
    return null;
  }
  const restored = Array.isArray(event.restored) ? event.restored.map(String) : [];
  const missing = Array.isArray(event.missing) ? (event.missing as IMissingVariable[]) : [];
  return {
    old: String(event.old_provider ?? '?'),
    new: String(event.new_provider ?? '?'),
    restored,
    missing,
    journal: String(event.journal ?? '')
  };
}

/** A provider's key for a toast: `7xKX…q3Zp`. */
function shortKey(key: string): string {
  return key.length > 12 ? `${key.slice(0, 4)}…${key.slice(-4)}` : key;
}

/**
 * The notice of a finished failover: `Provider 7xKX…q3Zp was lost; the kernel continues on
 * 9aBc…d4Ef. Restored: model, df. Missing: x (cell [3]), y (cell [4]).`
 */
export function failoverText(launch: ILaunch): string | null {
  const facts = failoverFacts(launch);
  if (!facts) {
    return null;
  }
  const restored =
    facts.journal && facts.journal !== 'restored'
      ? `Nothing restored (${facts.journal}).`
      : `Restored: ${facts.restored.length ? facts.restored.join(', ') : 'nothing'}.`;
  const missing = facts.missing.length
    ? ' Missing: ' +
      facts.missing
        .map(m => `${m.name} (${typeof m.cell === 'number' ? `cell [${m.cell}]` : 'unknown cell'})`)
        .join(', ') +
      '.'
    : '';
  return `Provider ${shortKey(facts.old)} was lost; the kernel continues on provider ${shortKey(facts.new)}. ${restored}${missing}`;
}

/** The execution counts of the cells that made the missing variables, each once, in order. */
export function missingCells(missing: IMissingVariable[]): number[] {
  const cells = new Set<number>();
  for (const item of missing) {
    if (typeof item.cell === 'number' && Number.isInteger(item.cell)) {
      cells.add(item.cell);
    }
  }
  return [...cells].sort((a, b) => a - b);
}

/** What re-running a failover's missing cells in the notebook did. */
export interface IRerunResult {
  /** The execution counts of the notebook's cells that ran (in order). */
  ran: number[];
  /** The counts no code cell of the kernel's notebook shows now (edited or re-run since): not run. */
  notFound: number[];
  /** The count of the cell that failed, if one did (the cells after it did not run). */
  failed: number | null;
}

/**
 * Runs, in the open notebook(s) of `kernelId`, the code cells whose execution count is one of
 * `cells`, in notebook order, so their outputs appear under them. It runs the notebook's own
 * cells, never a source the provider's journal recorded (a lost provider wrote that text).
 */
export type RerunCells = (kernelId: string, cells: number[]) => Promise<IRerunResult>;

/**
 * Shows a notification per kernel start: it follows the steps (leasing → escrow →
 * launching → [environment] → ready) and ends as a success that closes by itself, or as an error that
 * stays, saying what went wrong and what to do (with an Airdrop button when the wallet is
 * short and its ledger can airdrop).
 */
export class LaunchNotifier {
  constructor(model: GpuModel, commands: CommandRegistry, rerunCells?: RerunCells) {
    this._model = model;
    this._commands = commands;
    this._rerunCells = rerunCells ?? null;
    model.changed.connect((_, change) => {
      if (change === 'launches') {
        this._update();
      }
    });
  }

  private _update(): void {
    for (const launch of this._model.launches) {
      if (launch.started_at < this._model.createdAt - 5) {
        continue; // began before this page loaded: history, not news
      }
      const key = `${launch.kernel_id}@${launch.started_at}`;
      const shown = this._shown.get(key);
      if (shown && shown.updatedAt === launch.updated_at) {
        continue;
      }
      if (shown?.done) {
        continue;
      }
      this._show(key, launch, shown?.id);
    }
  }

  private _show(key: string, launch: ILaunch, id: string | undefined): void {
    let message: string;
    let type: Notification.TypeOptions;
    let autoClose: number | false;
    const failover = failoverText(launch);
    const moving = launch.events[0]?.step === 'failover' && launch.events[0]?.phase === 'lost';
    if (failover !== null && launch.state === 'ready') {
      message = failover;
      type = 'warning';
      autoClose = false;
    } else if (launch.state === 'failed') {
      message = failureText(gpuName(this._model, launch) ?? 'GPU', launch.message);
      type = 'error';
      autoClose = false;
    } else if (launch.state === 'ready') {
      message = `${title(this._model, launch)} is ready · ${stepLine(launch)}`;
      type = 'success';
      autoClose = 5000;
    } else if (environmentText(launch) !== null) {
      message = `Starting a ${title(this._model, launch)}: ${environmentText(launch)} · ${stepLine(launch)}`;
      type = 'in-progress';
      autoClose = false;
    } else if (queueText(launch) !== null) {
      message = `In the class's queue for a ${title(this._model, launch)}: ${queueText(launch)} · ${stepLine(launch)}`;
      type = 'in-progress';
      autoClose = false;
    } else if (moving) {
      message = `Provider lost: moving the kernel to a ${title(this._model, launch)} · ${stepLine(launch)}`;
      type = 'in-progress';
      autoClose = false;
    } else {
      message = `Starting a ${title(this._model, launch)} · ${stepLine(launch)}`;
      type = 'in-progress';
      autoClose = false;
    }
    const options: Notification.IOptions<{ kernelId: string; step: string }> = {
      autoClose,
      data: { kernelId: launch.kernel_id, step: launch.step }
    };
    if (launch.state === 'failed' && SHORT_OF.test(launch.message) && this._model.wallet?.rpc_url) {
      options.actions = [
        {
          label: 'Airdrop 1 SOL',
          caption: `Ask ${this._model.wallet.rpc_url} for 1 SOL of test funds`,
          callback: () => void this._commands.execute(CommandIDs.airdrop)
        }
      ];
    }
    const facts = failover !== null ? failoverFacts(launch) : null;
    const cells = facts ? missingCells(facts.missing) : [];
    if (facts && cells.length && this._rerunCells) {
      const rerunCells = this._rerunCells;
      options.actions = [
        {
          label: 'Re-run missing cells',
          caption:
            `Run the notebook's cell(s) ${cells.map(c => `[${c}]`).join(', ')} ` +
            `that made ${facts.missing.map(m => m.name).join(', ')}`,
          callback: () => void this._rerun(launch.kernel_id, cells, rerunCells)
        }
      ];
    }
    if (id === undefined || !Notification.update({ id, message, type, ...options })) {
      id = Notification.emit(message, type, options);
    }
    this._shown.set(key, {
      id,
      updatedAt: launch.updated_at,
      done: launch.state !== 'starting'
    });
  }

  /** Runs the notebook's cells `cells` (execution counts) and says what ran and what was not found. */
  private async _rerun(kernelId: string, cells: number[], rerunCells: RerunCells): Promise<void> {
    const id = Notification.emit(`Re-running ${cells.length} cell(s)…`, 'in-progress', {
      autoClose: false
    });
    let result: IRerunResult;
    try {
      result = await rerunCells(kernelId, cells);
    } catch (error) {
      Notification.update({
        id,
        message: `Re-running the cells failed: ${String(error)}`,
        type: 'error',
        autoClose: false
      });
      return;
    }
    const list = (counts: number[]) => counts.map(c => `[${c}]`).join(', ');
    const notFound = result.notFound.length
      ? ` Not found in the notebook (edited or re-run since), not run: cell(s) ${list(result.notFound)}.`
      : '';
    if (result.failed !== null) {
      Notification.update({
        id,
        message: `Re-running cell [${result.failed}] failed; the cells after it did not run.${notFound}`,
        type: 'error',
        autoClose: false
      });
    } else if (!result.ran.length) {
      Notification.update({ id, message: `Re-ran no cell.${notFound}`, type: 'warning', autoClose: false });
    } else {
      Notification.update({
        id,
        message: `Re-ran ${result.ran.length} cell(s) of the notebook: ${list(result.ran)}.${notFound}`,
        type: notFound ? 'warning' : 'success',
        autoClose: notFound ? false : 5000
      });
    }
  }

  private _model: GpuModel;
  private _commands: CommandRegistry;
  private _rerunCells: RerunCells | null;
  private _shown = new Map<string, { id: string; updatedAt: number; done: boolean }>();
}
