import { JupyterFrontEnd } from '@jupyterlab/application';
import { Notification } from '@jupyterlab/apputils';
import { PathExt } from '@jupyterlab/coreutils';
import { Poll } from '@lumino/polling';
import { ISignal } from '@lumino/signaling';
import { Widget } from '@lumino/widgets';

import { h, placeChildren, setAttr, setText } from './dom';
import { errorMessage, requestAPI } from './handler';
import { GpuModel } from './model';

/** How often the file channel's state is read while a remote kernel runs (ms). */
const FILES_INTERVAL = 2000;
/** ...and while a transfer this page follows is in progress. */
const PROGRESS_INTERVAL = 400;
/** Transfers at least this large get a progress notification. */
export const PROGRESS_MIN_BYTES = 4 * 1024 * 1024;
/** What the file browser's items say of themselves (the first line of their title). */
const TITLE_PREFIX = 'jupyter-io: ';

/** One transfer, as `GET /jupyter-io/files` gives it (docs/server-extension-api.md). */
export interface ITransfer {
  id: string;
  direction: 'sent' | 'received';
  why: string;
  files: number;
  bytes: number;
  written: string[];
  conflicts: [string, string][];
  held_back: [string, number][];
  seconds: number;
  /** Incoming transfers in progress: the files they carry, and their size in all. */
  paths?: string[];
  total_bytes?: number;
}

/** One kernel's file channel. */
export interface IKernelFiles {
  kernel_id: string;
  root: string;
  enabled: boolean;
  synced: boolean;
  active: ITransfer[];
  held_back: [string, number][];
  conflicts: [string, string][];
  history: ITransfer[];
}

/** What a file browser item is to a remote kernel. */
export type FileState = 'remote' | 'syncing' | 'conflict';

interface IMark {
  state: FileState;
  text: string;
  kernelId: string;
  /** The path relative to the kernel's notebook directory. */
  path: string;
  size?: number;
}

/** The file browser, as far as this module uses it (JupyterLab's `FileBrowser`). */
interface IBrowser extends Widget {
  model: {
    path: string;
    refresh(): Promise<void>;
    pathChanged: ISignal<unknown, unknown>;
    refreshed: ISignal<unknown, void>;
  };
  addWidget?(widget: Widget): void;
}

/** `25165824` → `"24.0 MB"`. */
export function megabytes(bytes: number): string {
  const mb = bytes / 1e6;
  return mb >= 10 ? `${Math.round(mb)} MB` : `${mb.toFixed(1)} MB`;
}

/** `Receiving big.bin: 12 of 48 MB (25%)` for a transfer in progress. */
export function progressText(verb: string, what: string, bytes: number, total: number | null): string {
  if (total === null || total <= 0) {
    return `${verb} ${what}: ${megabytes(bytes)}`;
  }
  const percent = Math.min(100, Math.floor((100 * bytes) / total));
  return `${verb} ${what}: ${megabytes(bytes)} of ${megabytes(total)} (${percent}%)`;
}

function names(paths: string[]): string {
  const shown = paths.slice(0, 3).map(p => PathExt.basename(p));
  return paths.length > 3 ? `${shown.join(', ')} and ${paths.length - 3} more` : shown.join(', ');
}

/**
 * The remote kernels' files in JupyterLab: while a jupyter-io kernel runs (and the page is
 * visible) it reads `GET /jupyter-io/files` every 2 s and
 * - marks the file browser's items of each kernel's notebook directory: `jio-mod-remote`
 *   (a newer copy is held back on the provider: pull it), `jio-mod-syncing` (in a
 *   transfer), `jio-mod-conflict` (both sides changed it: the kernel's copy is the
 *   `name.remote-conflict.ext` beside it), with a title line that says so;
 * - lists, below the listing, the held-back files not here at all, each with a Pull button;
 * - refreshes the listing when the kernel's files arrive in the folder shown;
 * - shows a progress notification for each transfer over {@link PROGRESS_MIN_BYTES}.
 */
export class FileMarks {
  constructor(options: FileMarks.IOptions) {
    this._app = options.app;
    this._model = options.model;
    this._section = new RemoteFilesSection(path => void this.pull(path));
    this._poll = new Poll({
      factory: () => this._fetch(),
      frequency: { interval: FILES_INTERVAL, backoff: true, max: 30_000 },
      name: 'jupyter-io:files',
      standby: () => (!this._pulling && !this._remoteKernelRuns()) || 'when-hidden'
    });
    this._model.changed.connect((_, change) => {
      if (change === 'sessions' && this._remoteKernelRuns() && !this._state.size) {
        void this._poll.refresh();
      }
    });
    this._app.restored.then(() => this._attach()).catch(() => undefined);
  }

  /** Every kernel's held-back files: `[kernelId, path relative to its directory, size]`. */
  heldBack(kernelId?: string | null): [string, string, number][] {
    const found: [string, string, number][] = [];
    for (const files of this._state.values()) {
      if (!kernelId || files.kernel_id === kernelId) {
        for (const [path, size] of files.held_back) {
          found.push([files.kernel_id, path, size]);
        }
      }
    }
    return found;
  }

  /** The kernel and kernel-relative path of a path in Lab's file browser, if a remote
   * kernel's notebook directory holds it. */
  locate(labPath: string): { kernelId: string; path: string } | null {
    for (const [kernelId, dir] of this._dirs) {
      const prefix = dir ? dir + '/' : '';
      if (this._state.has(kernelId) && labPath.startsWith(prefix) && labPath.length > prefix.length) {
        return { kernelId, path: labPath.slice(prefix.length) };
      }
    }
    return null;
  }

  /**
   * Bring `paths` (relative to the kernel's notebook directory; default: all it holds back)
   * from kernel `kernelId`, with a progress notification when they are large; the
   * notification ends saying what came, and which came beside a local copy (conflicts).
   */
  async pull(labPath: string): Promise<void>;
  async pull(kernelId: string, paths: string[]): Promise<void>;
  async pull(first: string, paths?: string[]): Promise<void> {
    let kernelId = first;
    if (paths === undefined) {
      const found = this.locate(first);
      if (!found) {
        Notification.warning(`${first} is not in a remote kernel's notebook directory.`, { autoClose: 5000 });
        return;
      }
      kernelId = found.kernelId;
      paths = [found.path];
    }
    const sizes = new Map(this._state.get(kernelId)?.held_back ?? []);
    const total = paths.reduce((sum, p) => sum + (sizes.get(p) ?? 0), 0);
    const what = names(paths);
    const started = Date.now();
    let id: string | null = null;
    if (total >= PROGRESS_MIN_BYTES) {
      id = Notification.emit(progressText('Pulling', what, 0, total), 'in-progress', {
        autoClose: false,
        data: { kernelId, paths }
      });
    }
    const pulling = { kernelId, paths, total, id };
    this._pulls.add(pulling);
    this._pulling = true;
    this._draw();
    void this._poll.refresh();
    let message: string;
    let type: Notification.TypeOptions = 'success';
    try {
      const transfer = await requestAPI<ITransfer>(`files/${kernelId}/pull`, {
        method: 'POST',
        body: JSON.stringify({ paths })
      });
      const seconds = ((Date.now() - started) / 1000).toFixed(1);
      const brought = [...transfer.written, ...transfer.conflicts.map(c => c[0])];
      const what = brought.length ? names(brought) : 'nothing new';
      if (transfer.conflicts.length) {
        // Short: a toast shows 140 characters.
        type = 'warning';
        const copies = names(transfer.conflicts.map(c => c[1]));
        message =
          `Pulled ${what} (${megabytes(transfer.bytes)}). ` +
          `Both sides changed it: the kernel's copy is ${copies}.`;
      } else {
        message = `Pulled ${what} (${megabytes(transfer.bytes)}) from the remote kernel in ${seconds} s.`;
      }
    } catch (error) {
      type = 'error';
      message = `Not pulled from the remote kernel (${what}): ${errorMessage(error)}`;
    } finally {
      this._pulls.delete(pulling);
      this._pulling = this._pulls.size > 0;
    }
    const options = { autoClose: type === 'error' ? (false as const) : 6000, data: { kernelId, paths } };
    if (id === null || !Notification.update({ id, message, type, ...options })) {
      Notification.emit(message, type, options);
    }
    await this._poll.refresh();
    await this._refreshBrowser();
  }

  /** The mark of the item at `labPath` in the file browser (tests, the context menu). */
  markOf(labPath: string): IMark | null {
    return this._marks.get(labPath) ?? null;
  }

  private _remoteKernelRuns(): boolean {
    return this._model.sessions.some(s => s.state === 'running');
  }

  private async _fetch(): Promise<void> {
    if (!this._remoteKernelRuns() && !this._pulling && !this._state.size) {
      return;
    }
    const [{ kernels }, sessions] = await Promise.all([
      requestAPI<{ kernels: IKernelFiles[] }>('files'),
      this._app.serviceManager.sessions.ready.then(() => [...this._app.serviceManager.sessions.running()])
    ]);
    const dirs = new Map<string, string>();
    for (const session of sessions) {
      if (session.kernel && !dirs.has(session.kernel.id)) {
        dirs.set(session.kernel.id, PathExt.dirname(session.path));
      }
    }
    const state = new Map(kernels.map(k => [k.kernel_id, k] as [string, IKernelFiles]));
    let arrived = false;
    for (const files of kernels) {
      const dir = dirs.get(files.kernel_id);
      const seen = this._seen.get(files.kernel_id);
      const fresh = files.history.filter(t => t.direction === 'received' && !(seen?.has(t.id) ?? false));
      if (seen !== undefined && fresh.some(t => t.written.length > 0)) {
        arrived ||= dir !== undefined;
      }
      this._seen.set(files.kernel_id, new Set(files.history.map(t => t.id)));
      this._follow(files);
    }
    for (const kernelId of [...this._seen.keys()]) {
      if (!state.has(kernelId)) {
        this._seen.delete(kernelId);
      }
    }
    this._state = state;
    this._dirs = dirs;
    this._endFollowed();
    this._draw();
    if (arrived) {
      await this._refreshBrowser();
    }
    const following = this._pulling || this._followed.size > 0;
    const interval = following ? PROGRESS_INTERVAL : FILES_INTERVAL;
    if (this._poll.frequency.interval !== interval) {
      this._poll.frequency = { ...this._poll.frequency, interval };
    }
  }

  /** Progress notifications for large transfers this page did not ask for (the pull
   * after an execution, a push of local edits, the session's end). */
  private _follow(files: IKernelFiles): void {
    for (const transfer of files.active) {
      const total = transfer.total_bytes ?? null;
      const mine = [...this._pulls].find(p => p.kernelId === files.kernel_id && p.id !== null);
      if (mine) {
        if (transfer.direction === 'received') {
          Notification.update({
            id: mine.id!,
            message: progressText('Pulling', names(mine.paths), transfer.bytes, total ?? mine.total),
            type: 'in-progress',
            autoClose: false
          });
        }
        continue;
      }
      const followed = this._followed.get(transfer.id);
      if (!followed && Math.max(total ?? 0, transfer.bytes) < PROGRESS_MIN_BYTES) {
        continue;
      }
      const verb =
        transfer.direction === 'received' ? 'Receiving from the remote kernel' : 'Sending to the remote kernel';
      const what = transfer.paths?.length ? names(transfer.paths) : `${transfer.files} file(s)`;
      const message = progressText(verb, what, transfer.bytes, total);
      if (followed) {
        Notification.update({ id: followed.id, message, type: 'in-progress', autoClose: false });
        followed.seen = true;
      } else {
        const id = Notification.emit(message, 'in-progress', { autoClose: false });
        this._followed.set(transfer.id, { id, kernelId: files.kernel_id, seen: true });
      }
    }
  }

  private _endFollowed(): void {
    for (const [transferId, followed] of this._followed) {
      if (followed.seen) {
        followed.seen = false;
        continue;
      }
      this._followed.delete(transferId);
      const done = this._state.get(followed.kernelId)?.history.find(t => t.id === transferId);
      if (done) {
        const verb = done.direction === 'received' ? 'Received from' : 'Sent to';
        const message =
          `${verb} the remote kernel: ${done.files} file(s), ` +
          `${megabytes(done.bytes)} in ${done.seconds.toFixed(1)} s.`;
        Notification.update({ id: followed.id, message, type: 'success', autoClose: 4000 });
      } else {
        Notification.dismiss(followed.id);
      }
    }
  }

  /** Every mark, by the path in Lab's file browser. */
  private _computeMarks(): Map<string, IMark> {
    const marks = new Map<string, IMark>();
    for (const [kernelId, files] of this._state) {
      const dir = this._dirs.get(kernelId);
      if (dir === undefined) {
        continue;
      }
      const put = (path: string, mark: Omit<IMark, 'kernelId' | 'path'>) =>
        marks.set(PathExt.join(dir, path), { ...mark, kernelId, path });
      for (const [path, keptAs] of files.conflicts) {
        put(path, {
          state: 'conflict',
          text: `changed here and on the remote kernel: its copy is ${PathExt.basename(keptAs)}`
        });
        put(keptAs, {
          state: 'conflict',
          text: `the remote kernel's copy of ${PathExt.basename(path)}, which changed on both sides`
        });
      }
      for (const [path, size] of files.held_back) {
        put(path, {
          state: 'remote',
          size,
          text:
            `a newer copy (${megabytes(size)}) is on the remote kernel: ` +
            'right-click → Pull from the remote kernel'
        });
      }
      const syncing = new Set<string>();
      for (const transfer of files.active) {
        transfer.paths?.forEach(p => syncing.add(p));
      }
      for (const pulling of this._pulls) {
        if (pulling.kernelId === kernelId) {
          pulling.paths.forEach(p => syncing.add(p));
        }
      }
      for (const path of syncing) {
        put(path, { state: 'syncing', text: 'coming from the remote kernel now' });
      }
    }
    return marks;
  }

  /** Mark the file browser's items, and list the held-back files that are not here. */
  private _draw(): void {
    this._marks = this._computeMarks();
    const browser = this._browser;
    if (!browser) {
      return;
    }
    this._markItems();
    const dir = browser.model.path.replace(/^[^/:]*:/, '');
    const present = new Set(
      [...browser.node.querySelectorAll<HTMLElement>('.jp-DirListing-item')].map(item => this._itemName(item))
    );
    const absent = [...this._marks.entries()].filter(
      ([labPath, mark]) =>
        mark.state !== 'conflict' && PathExt.dirname(labPath) === dir && !present.has(PathExt.basename(labPath))
    );
    this._section.draw(absent);
  }

  private _itemName(item: HTMLElement): string {
    return item.querySelector('.jp-DirListing-itemText')?.textContent ?? '';
  }

  private _markItems(): void {
    const browser = this._browser;
    if (!browser) {
      return;
    }
    const dir = browser.model.path.replace(/^[^/:]*:/, '');
    for (const item of browser.node.querySelectorAll<HTMLElement>('.jp-DirListing-item')) {
      const labPath = PathExt.join(dir, this._itemName(item));
      const mark = this._marks.get(labPath) ?? null;
      for (const state of ['remote', 'syncing', 'conflict'] as FileState[]) {
        item.classList.toggle(`jio-mod-${state}`, mark?.state === state);
      }
      setAttr(item, 'data-jio-file', mark?.state ?? null);
      setAttr(item, 'data-jio-path', mark ? labPath : null);
      const title = item.title ?? '';
      const labTitle = title.startsWith(TITLE_PREFIX) ? title.slice(title.indexOf('\n') + 1) : title;
      const wanted = mark ? `${TITLE_PREFIX}${mark.text}\n${labTitle}` : labTitle;
      if (title !== wanted) {
        item.title = wanted;
      }
    }
  }

  private async _refreshBrowser(): Promise<void> {
    await this._browser?.model.refresh().catch(() => undefined);
  }

  /** Find the file browser once Lab is restored, and follow its folder and renders. */
  private _attach(): void {
    const browser = [...this._app.shell.widgets('left')].find(w => w.id === 'filebrowser') as
      | IBrowser
      | undefined;
    if (!browser?.model) {
      return;
    }
    this._browser = browser;
    browser.addWidget?.(this._section);
    browser.model.pathChanged.connect(() => this._draw());
    browser.model.refreshed.connect(() => this._draw());
    // The listing redraws its items (and their titles) as it likes: mark them again after.
    const observer = new MutationObserver(() => {
      if (this._marks.size) {
        this._markItems();
      }
    });
    observer.observe(browser.node, { subtree: true, childList: true, attributeFilter: ['title'] });
    this._draw();
  }

  private _app: JupyterFrontEnd;
  private _model: GpuModel;
  private _poll: Poll;
  private _section: RemoteFilesSection;
  private _browser: IBrowser | null = null;
  private _state = new Map<string, IKernelFiles>();
  /** kernel id → its notebook's directory, as Lab's paths go. */
  private _dirs = new Map<string, string>();
  private _marks = new Map<string, IMark>();
  private _seen = new Map<string, Set<string>>();
  private _pulls = new Set<{ kernelId: string; paths: string[]; total: number; id: string | null }>();
  private _pulling = false;
  private _followed = new Map<string, { id: string; kernelId: string; seen: boolean }>();
}

export namespace FileMarks {
  export interface IOptions {
    app: JupyterFrontEnd;
    model: GpuModel;
  }
}

/** Below the file browser's listing: the remote kernel's held-back files that are not
 * here yet (a new file is not in the listing to be marked), each with a Pull button. */
class RemoteFilesSection extends Widget {
  constructor(onPull: (labPath: string) => void) {
    super();
    this._onPull = onPull;
    this.id = 'jupyter-io-remote-files';
    this.addClass('jio-RemoteFiles');
    this.node.append(this._heading, this._list);
    this.hide();
  }

  draw(files: [string, IMark][]): void {
    const rows = files.map(([labPath, mark]) => {
      let row = this._rows.get(labPath);
      if (!row) {
        const button = h('button', { class: 'jp-Button jp-mod-styled jp-mod-accept jio-RemoteFile-pull' }, 'Pull');
        button.addEventListener('click', () => this._onPull(labPath));
        row = h(
          'li',
          { class: 'jio-RemoteFile', 'data-jio-path': labPath },
          h('span', { class: 'jio-RemoteFile-name' }, PathExt.basename(labPath)),
          h('span', { class: 'jio-RemoteFile-size' }),
          button
        );
        this._rows.set(labPath, row);
      }
      row.classList.toggle('jio-mod-syncing', mark.state === 'syncing');
      setAttr(row, 'data-jio-file', mark.state);
      setAttr(row, 'title', `${TITLE_PREFIX}${mark.text}`);
      setText(row.querySelector('.jio-RemoteFile-size')!, mark.size ? megabytes(mark.size) : '…');
      (row.querySelector('button') as HTMLButtonElement).disabled = mark.state === 'syncing';
      return row;
    });
    for (const labPath of [...this._rows.keys()]) {
      if (!files.some(([p]) => p === labPath)) {
        this._rows.delete(labPath);
      }
    }
    placeChildren(this._list, rows);
    this.setHidden(rows.length === 0);
  }

  private _onPull: (labPath: string) => void;
  private _heading = h('div', { class: 'jio-RemoteFiles-heading' }, 'On the remote kernel only (not pulled yet)');
  private _list = h('ul', { class: 'jio-RemoteFiles-list' });
  private _rows = new Map<string, HTMLElement>();
}
