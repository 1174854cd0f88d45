import { Dialog, InputDialog, Notification, showDialog } from '@jupyterlab/apputils';
import { Poll } from '@lumino/polling';
import { Widget } from '@lumino/widgets';

import { CohortModel, gpuHours, teaches } from './cohorts';
import { h, keyedNodes, placeChildren, setAttr, setText, show } from './dom';
import { duration, parseSol, shortKey, sol } from './format';
import { errorMessage, requestAPI } from './handler';
import { gpuIcon } from './icons';
import { IDashboard, IQueueEntry, IStudentUsage } from './types';

/** The dashboard is fetched this often while it is shown (the issue asks for ≤ 10 s);
 * never while it or the page is hidden. */
export const DASHBOARD_INTERVAL = 5_000;

/** `Tue 16 Dec` for a projected date. */
function day(at: number): string {
  return new Date(at * 1000).toLocaleDateString(undefined, {
    weekday: 'short',
    day: 'numeric',
    month: 'short'
  });
}

/** One student's row, updated in place (its buttons keep their identity across fetches). */
class StudentRow {
  constructor(student: string, actions: { revoke: (s: string) => void; topUp: (s: string) => void }) {
    this.node = h('tr', { class: 'jio-Dashboard-row', 'data-student': student });
    const key = h('code', { title: student }, shortKey(student));
    const revoke = h('button', { class: 'jp-Button jio-Button jp-mod-styled jio-Dashboard-revoke', type: 'button' }, 'Remove');
    revoke.addEventListener('click', () => actions.revoke(student));
    const topUp = h('button', { class: 'jp-Button jio-Button jp-mod-styled jio-Dashboard-topup', type: 'button' }, 'Top up');
    topUp.addEventListener('click', () => actions.topUp(student));
    this.node.append(
      h('td', { class: 'jio-Dashboard-student' }, key),
      this._hours,
      this._cost,
      this._live,
      this._idle,
      this._queued,
      this._left,
      this._allowance,
      h('td', { class: 'jio-Dashboard-actions' }, topUp, ' ', revoke)
    );
  }

  update(row: IStudentUsage): void {
    setText(this._hours, gpuHours(row.gpu_seconds_week));
    setText(this._cost, sol(row.cost_lamports_week));
    setText(this._live, String(row.live_kernels));
    setText(this._idle, row.idle_seconds === null || row.live_kernels === 0 ? '–' : duration(row.idle_seconds));
    setText(this._queued, row.queued ? `${row.queued} waiting` : '–');
    setText(this._left, gpuHours(row.quota_left_gpu_seconds));
    this.node.classList.toggle('jio-mod-out', row.quota_left_gpu_seconds <= 0);
    const allowance = row.allowance;
    setText(this._allowance, !allowance ? '–' : allowance.as_agreed ? sol(allowance.spendable_lamports) : 'not as agreed');
    setAttr(
      this._allowance,
      'title',
      !allowance
        ? 'No allowance on-chain (not funded yet, reclaimed, or not reported)'
        : allowance.as_agreed
          ? `${sol(allowance.spendable_lamports)} spendable: ${sol(allowance.amount_lamports)} held, ${sol(allowance.delegated_lamports)} delegated`
          : (allowance.problem ?? 'not as agreed')
    );
  }

  readonly node: HTMLTableRowElement;
  private _hours = h('td', { class: 'jio-Dashboard-hours' });
  private _cost = h('td', { class: 'jio-Dashboard-cost' });
  private _live = h('td', { class: 'jio-Dashboard-live' });
  private _idle = h('td', { class: 'jio-Dashboard-idle' });
  private _queued = h('td', { class: 'jio-Dashboard-queued' });
  private _left = h('td', { class: 'jio-Dashboard-left' });
  private _allowance = h('td', { class: 'jio-Dashboard-allowance' });
}

/**
 * An instructor's dashboard of one class (a main-area panel): a row per student (GPU-hours
 * this week, cost, live kernels, idle time, queue, quota left) with top-up and remove
 * buttons, the pool (funded, spent, projected run-out), the queue, and a CSV export.
 * Fetched every {@link DASHBOARD_INTERVAL} ms while shown; paused while hidden.
 */
export class CohortDashboard extends Widget {
  constructor(options: CohortDashboard.IOptions) {
    super();
    this._cohorts = options.cohorts;
    this.cohortId = options.cohortId;
    this.id = `jupyter-io-dashboard-${options.cohortId}`;
    this.addClass('jio-Dashboard');
    this.title.label = 'Class dashboard';
    this.title.icon = gpuIcon;
    this.title.closable = true;
    const button = (label: string, className: string, onClick: () => void) => {
      const el = h('button', { class: `jp-Button jio-Button jp-mod-styled ${className}`, type: 'button' }, label);
      el.addEventListener('click', onClick);
      return el;
    };
    const head = (...labels: string[]) => h('tr', {}, ...labels.map(label => h('th', {}, label)));
    this.node.append(
      h(
        'div',
        { class: 'jio-Dashboard-header' },
        this._title,
        button('Export CSV', 'jio-Dashboard-csv', () => void this.exportCsv()),
        button('Top up every student', 'jio-Dashboard-topupAll', () => void this._topUp(null)),
        button('Refresh', 'jio-Dashboard-refresh', () => void this._poll.refresh())
      ),
      this._error,
      this._pool,
      h(
        'table',
        { class: 'jio-Dashboard-table' },
        h('thead', {}, head('Student', 'GPU-h this week', 'Cost this week', 'Live kernels', 'Idle', 'Queue', 'GPU-h left', 'Allowance left', '')),
        this._rowsNode
      ),
      this._empty,
      h('h3', { class: 'jio-Picker-subtitle' }, 'Queue'),
      this._queue,
      this._updated
    );
    this._poll = new Poll({
      factory: () => this._fetch(),
      frequency: { interval: DASHBOARD_INTERVAL, backoff: true, max: 60_000 },
      name: `jupyter-io:dashboard:${options.cohortId}`,
      // Hidden (another tab in front) or the page hidden: no requests.
      standby: () => !this.isVisible || 'when-hidden'
    });
  }

  readonly cohortId: string;

  /** The last dashboard fetched (null before the first). */
  get dashboard(): IDashboard | null {
    return this._data;
  }

  dispose(): void {
    this._poll.dispose();
    super.dispose();
  }

  protected onAfterShow(): void {
    void this._poll.refresh();
  }

  /** Download the week's CSV (`cohort-{id}-week.csv`). */
  async exportCsv(): Promise<void> {
    try {
      const text = await requestAPI<string>(`cohorts/${this.cohortId}/dashboard?format=csv`);
      const url = URL.createObjectURL(new Blob([text], { type: 'text/csv' }));
      const link = h('a', { href: url, download: `cohort-${this.cohortId}-week.csv` });
      document.body.append(link);
      link.click();
      link.remove();
      window.setTimeout(() => URL.revokeObjectURL(url), 10_000);
    } catch (error) {
      Notification.error(`CSV not exported: ${errorMessage(error)}`, { autoClose: false });
    }
  }

  private async _fetch(): Promise<void> {
    try {
      this._data = await requestAPI<IDashboard>(`cohorts/${this.cohortId}/dashboard`);
      this._errorText = null;
    } catch (error) {
      this._errorText = errorMessage(error);
      this._render();
      throw error; // back off
    }
    this._render();
  }

  private _render(): void {
    show(this._error, !!this._errorText);
    setText(this._error, this._errorText ?? '');
    const data = this._data;
    if (!data) {
      return;
    }
    const cohort = data.cohort;
    this.title.label = `${cohort.name} · dashboard`;
    setText(this._title, `${cohort.name}: ${gpuHours(cohort.quota_gpu_seconds_per_week)} GPU-h a week per student`);
    const pool = data.pool;
    const parts = [
      // null: this coordinator does not read the allowances on-chain (not "unfunded").
      pool.allowance_lamports === null ? 'pool left not reported' : `pool left ${sol(pool.allowance_lamports)}`,
      `spent this term ${sol(pool.spent_lamports_term)}`,
      pool.projected_run_out === null ? 'no run-out projected' : `runs out around ${day(pool.projected_run_out)}`
    ];
    setText(this._pool, parts.join(' · '));
    setAttr(this._pool, 'title', pool.projected_run_out === null ? null : new Date(pool.projected_run_out * 1000).toString());
    const nodes = keyedNodes(
      this._rows,
      data.students,
      student => student.student,
      student =>
        new StudentRow(student.student, {
          revoke: s => void this._revoke(s),
          topUp: s => void this._topUp(s)
        }),
      (row, student) => row.update(student)
    );
    placeChildren(this._rowsNode, nodes);
    show(this._empty, nodes.length === 0);
    setText(this._empty, 'No students yet: share a join code (`jupyter io cohort code`).');
    const waiting = data.queue.map((entry, index) => queueLine(entry, index, data.generated_at));
    placeChildren(this._queue, waiting.length ? waiting : [h('div', { class: 'jio-Note' }, 'Nobody is waiting.')]);
    setText(this._updated, `Updated ${new Date(data.generated_at * 1000).toLocaleTimeString()}`);
  }

  private async _revoke(student: string): Promise<void> {
    const answer = await showDialog({
      title: 'Remove the student?',
      body: `${student} leaves ${this._data?.cohort.name ?? 'the class'}: their running kernels end and their place in the queue is dropped.`,
      buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Remove' })]
    });
    if (!answer.button.accept) {
      return;
    }
    try {
      await requestAPI(`cohorts/${this.cohortId}/members/${student}`, { method: 'DELETE' });
      Notification.success(`Removed ${shortKey(student)}.`, { autoClose: 5000 });
      void this._cohorts.refresh();
    } catch (error) {
      Notification.error(`Not removed: ${errorMessage(error)}`, { autoClose: false });
    }
    void this._poll.refresh();
  }

  private async _topUp(student: string | null): Promise<void> {
    const answer = await InputDialog.getText({
      title: student ? `Top up ${shortKey(student)}'s allowance` : 'Top up every student’s allowance',
      label: 'SOL to add from your wallet',
      text: '0.1',
      okLabel: 'Top up'
    });
    if (!answer.button.accept || answer.value === null) {
      return;
    }
    const lamports = parseSol(answer.value);
    if (lamports === null) {
      Notification.error(`Not topped up: ${answer.value} is not an amount of SOL such as 0.1`, { autoClose: false });
      return;
    }
    try {
      await requestAPI(`cohorts/${this.cohortId}/topup`, {
        method: 'POST',
        body: JSON.stringify({ lamports, student })
      });
      Notification.success(`Topped up by ${sol(lamports)}.`, { autoClose: 5000 });
    } catch (error) {
      Notification.error(`Not topped up: ${errorMessage(error)}`, { autoClose: false });
    }
    void this._poll.refresh();
  }

  private _cohorts: CohortModel;
  private _data: IDashboard | null = null;
  private _errorText: string | null = null;
  private _poll: Poll;
  private _rows = new Map<string, StudentRow>();
  private _title = h('h2', { class: 'jio-Dashboard-title' }, 'Class dashboard');
  private _error = h('div', { class: 'jio-Error' });
  private _pool = h('div', { class: 'jio-Dashboard-pool' });
  private _rowsNode = h('tbody');
  private _empty = h('div', { class: 'jio-Note jio-Dashboard-empty' });
  private _queue = h('div', { class: 'jio-Dashboard-queue' });
  private _updated = h('div', { class: 'jio-Note jio-Dashboard-updated' });
}

/** `1. 7xKX…gAsU · waiting 2:13 · about 3:00 more` (as of the dashboard's `now`). */
function queueLine(entry: IQueueEntry, index: number, now: number): HTMLElement {
  const wait = entry.estimated_wait_seconds;
  const parts = [`${entry.place ?? index + 1}. ${shortKey(entry.student ?? null)}`];
  if (entry.gpu) {
    parts.push(`for ${entry.gpu}`);
  }
  if (typeof entry.queued_at === 'number') {
    parts.push(`waiting ${duration(now - entry.queued_at)}`);
  }
  if (typeof wait === 'number') {
    parts.push(`about ${duration(wait)} more`);
  }
  return h('div', { class: 'jio-Dashboard-queued-entry', 'data-student': entry.student }, parts.join(' · '));
}

export namespace CohortDashboard {
  export interface IOptions {
    cohorts: CohortModel;
    cohortId: string;
  }
}

/** The class to open a dashboard for when none is named: the first the user teaches. */
export function firstTaught(cohorts: CohortModel): string | null {
  return cohorts.cohorts.find(teaches)?.id ?? null;
}
