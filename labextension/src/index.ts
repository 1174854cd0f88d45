import {
  ILabShell,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import {
  ICommandPalette,
  ISessionContext,
  InputDialog,
  Notification,
  SemanticCommand
} from '@jupyterlab/apputils';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { IStatusBar } from '@jupyterlab/statusbar';

import { BudgetNotifier } from './budget';
import { CohortModel, joinWithCode, WarningNotifier } from './cohorts';
import { CommandIDs } from './commands';
import { CohortDashboard, firstTaught } from './dashboard';
import { FileMarks } from './files';
import { parseSol, sol } from './format';
import { errorMessage } from './handler';
import { gpuIcon } from './icons';
import { GpuModel } from './model';
import { GpuPicker, notifyError } from './picker';
import { RoundTripNotifier } from './latency';
import { IRerunResult, LaunchNotifier } from './progress';
import { CostStatus } from './status';
import { IPreferencesUpdate } from './types';

const PLUGIN_ID = 'jupyter-io:plugin';
/** Every GPU kernelspec's name starts with this (jupyter_io/serverext/kernelspecs.py). */
const GPU_PREFIX = 'jupyter-io-';

/** The kernel id of the shell's current notebook or console, if it has one. */
function currentKernelId(app: JupyterFrontEnd, labShell: ILabShell | null): string | null {
  const widget = (labShell ?? app.shell).currentWidget as
    | (object & { sessionContext?: ISessionContext })
    | null;
  return widget?.sessionContext?.session?.kernel?.id ?? null;
}

/** The parts of a notebook panel a re-run needs (typed here: no @jupyterlab/notebook dependency). */
interface INotebookLike {
  id: string;
  sessionContext?: ISessionContext;
  content?: {
    widgets?: ReadonlyArray<{ model: { type: string; executionCount?: number | null } }>;
    activeCellIndex: number;
    deselectAll(): void;
  };
}

/**
 * Runs, in each open notebook whose kernel is `kernelId`, the code cells whose execution count
 * is one of `cells`, one at a time in notebook order, with Lab's own run command (NotebookActions.run),
 * so each output appears under its cell. Counts no such cell shows are `notFound` and nothing runs
 * for them; the journal's recorded sources are never executed.
 */
async function rerunNotebookCells(
  app: JupyterFrontEnd,
  kernelId: string,
  cells: number[]
): Promise<IRerunResult> {
  const wanted = new Set(cells);
  const found = new Set<number>();
  const ran: number[] = [];
  for (const widget of app.shell.widgets('main')) {
    const panel = widget as unknown as INotebookLike;
    const notebook = panel.content;
    if (panel.sessionContext?.session?.kernel?.id !== kernelId || !notebook?.widgets) {
      continue;
    }
    const targets = notebook.widgets
      .map((cell, index) => ({ index, count: cell.model.type === 'code' ? cell.model.executionCount : null }))
      .filter(
        (t): t is { index: number; count: number } =>
          typeof t.count === 'number' && wanted.has(t.count)
      );
    for (const { index, count } of targets) {
      found.add(count);
      notebook.activeCellIndex = index;
      notebook.deselectAll();
      const ok = await app.commands.execute('notebook:run-cell', {
        [SemanticCommand.WIDGET]: panel.id,
        activate: false
      });
      if (ok === false) {
        return { ran, notFound: cells.filter(c => !found.has(c)), failed: count };
      }
      ran.push(count);
    }
  }
  return { ran, notFound: cells.filter(c => !found.has(c)), failed: null };
}

/** The settings as the server's preferences (empty values clear a preference). */
function preferencesFrom(settings: ISettingRegistry.ISettings): IPreferencesUpdate {
  const price = String(settings.get('maxPricePerHour').composite ?? '').trim();
  const region = String(settings.get('region').composite ?? '').trim();
  const budget = Number(settings.get('sessionBudgetHours').composite ?? 0);
  const latency = Number(settings.get('maxLatencyMs').composite ?? 0);
  const reliable = Number(settings.get('minReliability').composite ?? 0);
  return {
    max_price_per_hour: price || null,
    region: region || null,
    max_latency_ms: latency > 0 ? latency : null,
    min_reliability: reliable > 0 ? reliable : null,
    session_budget_hours: budget > 0 ? budget : null
  };
}

/**
 * jupyter-io in JupyterLab: a GPU picker in the left sidebar, a notification that follows
 * each GPU kernel's start, a status bar item with the current kernel's GPU and cost, and
 * the price cap / region / budget in the settings registry (saved to the server, which
 * puts them into the GPU kernelspecs).
 */
const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'GPU picker, kernel start progress and live cost for jupyter-io kernels.',
  autoStart: true,
  optional: [ILabShell, IStatusBar, ISettingRegistry, ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    labShell: ILabShell | null,
    statusBar: IStatusBar | null,
    settingRegistry: ISettingRegistry | null,
    palette: ICommandPalette | null
  ): void => {
    const model = new GpuModel();
    const { commands } = app;
    new LaunchNotifier(model, commands, (kernelId, cells) => rerunNotebookCells(app, kernelId, cells));
    const topUp = (kernelId: string) => void commands.execute(CommandIDs.topUp, { kernelId });
    new BudgetNotifier({
      model,
      onTopUp: topUp,
      onSettings: () => void commands.execute('settingeditor:open', { query: 'jupyter-io' })
    });

    const cohorts = new CohortModel(model);
    new WarningNotifier(model);
    new RoundTripNotifier(model);
    const picker = new GpuPicker({ model, commands, cohorts });
    const files = new FileMarks({ app, model });
    app.shell.add(picker, 'left', { rank: 650 });

    const start = (command: string, args: Record<string, unknown>, kernelName: string) =>
      app.serviceManager.kernelspecs
        .refreshSpecs() // so Lab knows a GPU type that appeared since it loaded
        .then(() => {
          model.expectLaunch();
          return commands.execute(command, args as any);
        })
        .catch(error => notifyError(`Cannot start a kernel on ${kernelName}`, error));

    commands.addCommand(CommandIDs.openPicker, {
      label: 'Show the GPU picker',
      icon: gpuIcon,
      execute: () => app.shell.activateById(picker.id)
    });
    commands.addCommand(CommandIDs.newNotebook, {
      label: args => (args.kernelName ? `New notebook on ${args.kernelName}` : 'New GPU notebook'),
      icon: gpuIcon,
      execute: args => {
        const kernelName = String(args.kernelName ?? '');
        return start('notebook:create-new', { kernelName }, kernelName);
      }
    });
    commands.addCommand(CommandIDs.newConsole, {
      label: args => (args.kernelName ? `New console on ${args.kernelName}` : 'New GPU console'),
      icon: gpuIcon,
      execute: args => {
        const kernelName = String(args.kernelName ?? '');
        return start('console:create', { kernelPreference: { name: kernelName } }, kernelName);
      }
    });
    commands.addCommand(CommandIDs.refresh, {
      label: 'Refresh GPU offers',
      execute: () => Promise.all([model.refresh(), cohorts.refresh()])
    });
    commands.addCommand(CommandIDs.airdrop, {
      label: 'Airdrop 1 SOL to the jupyter-io wallet (test ledgers)',
      execute: () =>
        model.airdrop().then(
          wallet => Notification.success(`Airdropped 1 SOL; the wallet holds ${wallet.balance}.`, { autoClose: 5000 }),
          error => notifyError('Airdrop failed', error)
        )
    });
    commands.addCommand(CommandIDs.topUp, {
      label: 'Top up the GPU kernel’s escrow',
      execute: async args => {
        const kernelId = String(args.kernelId ?? currentKernelId(app, labShell) ?? '');
        const session = model.session(kernelId);
        if (!session || session.escrow === null) {
          Notification.info('The current kernel has no escrow to top up.', { autoClose: 5000 });
          return;
        }
        const answer = await InputDialog.getText({
          title: `Top up the escrow of the ${session.gpu ?? 'GPU'} kernel`,
          label: `SOL to add from the wallet (it holds ${model.wallet?.balance ?? 'an unknown amount'})`,
          text: sol(session.price_lamports_per_hour ?? 0, '') || '0.1',
          okLabel: 'Top up'
        });
        if (!answer.button.accept || answer.value === null) {
          return;
        }
        const lamports = parseSol(answer.value);
        if (lamports === null) {
          notifyError('Not topped up', `${answer.value} is not an amount of SOL such as 0.05`);
          return;
        }
        try {
          const after = await model.topUp(kernelId, lamports);
          Notification.success(
            `Escrow topped up by ${sol(lamports)}: it now holds ${sol(after.escrow_lamports)}.`,
            { autoClose: 5000 }
          );
        } catch (error) {
          notifyError('Not topped up', error);
        }
      }
    });
    commands.addCommand(CommandIDs.joinCohort, {
      label: 'Join a class (jupyter-io)',
      icon: gpuIcon,
      execute: async args => {
        let code = typeof args.code === 'string' ? args.code : '';
        if (!code) {
          const answer = await InputDialog.getText({
            title: 'Join a class',
            label: 'The join code or link your instructor gave you',
            placeholder: 'K7QX-M2PA-9R or jupyter-io:join?…',
            okLabel: 'Join'
          });
          if (!answer.button.accept || !answer.value) {
            return;
          }
          code = answer.value;
        }
        const cohort = await joinWithCode(cohorts, code);
        if (cohort) {
          app.shell.activateById(picker.id);
        }
      }
    });
    const dashboards = new Map<string, CohortDashboard>();
    commands.addCommand(CommandIDs.openDashboard, {
      label: 'Open a class dashboard (jupyter-io)',
      icon: gpuIcon,
      execute: async args => {
        if (!cohorts.loaded) {
          await cohorts.refresh().catch(() => undefined);
        }
        const cohortId = typeof args.cohortId === 'string' ? args.cohortId : firstTaught(cohorts);
        if (!cohortId) {
          Notification.info('You teach no class on this coordinator: create one with `jupyter io cohort create`.', {
            autoClose: 6000
          });
          return;
        }
        let dashboard = dashboards.get(cohortId);
        if (!dashboard || dashboard.isDisposed) {
          dashboard = new CohortDashboard({ cohorts, cohortId });
          dashboards.set(cohortId, dashboard);
          app.shell.add(dashboard, 'main');
        }
        app.shell.activateById(dashboard.id);
      }
    });
    commands.addCommand(CommandIDs.pullFiles, {
      label: 'Pull from the remote kernel',
      caption: 'Bring files the remote kernel holds back (too large to come back on their own)',
      execute: async args => {
        // From the file browser's context menu: the file right-clicked.
        const node = args.fromMenu ? app.contextMenuHitTest(n => n.dataset?.jioPath !== undefined) : null;
        if (node?.dataset.jioPath) {
          return files.pull(node.dataset.jioPath);
        }
        const kernelId = typeof args.kernelId === 'string' ? args.kernelId : currentKernelId(app, labShell);
        if (kernelId && Array.isArray(args.paths)) {
          return files.pull(kernelId, args.paths.map(String));
        }
        let held = files.heldBack(kernelId);
        if (held.length === 0) {
          held = files.heldBack(); // the current widget is not a remote kernel's: all of them
        }
        if (held.length === 0) {
          Notification.info('No remote kernel holds back a file: everything it wrote is here.', {
            autoClose: 5000
          });
          return;
        }
        const byKernel = new Map<string, string[]>();
        for (const [kernel, path] of held) {
          byKernel.set(kernel, [...(byKernel.get(kernel) ?? []), path]);
        }
        await Promise.all([...byKernel].map(([kernel, paths]) => files.pull(kernel, paths)));
      }
    });
    for (const selector of ['.jp-DirListing-item[data-jio-file="remote"]', '.jio-RemoteFile']) {
      app.contextMenu.addItem({ command: CommandIDs.pullFiles, selector, rank: 0, args: { fromMenu: true } });
    }
    if (palette) {
      for (const command of [
        CommandIDs.openPicker,
        CommandIDs.refresh,
        CommandIDs.airdrop,
        CommandIDs.topUp,
        CommandIDs.joinCohort,
        CommandIDs.openDashboard,
        CommandIDs.pullFiles
      ]) {
        palette.addItem({ command, category: 'jupyter-io' });
      }
    }

    // A GPU kernel started elsewhere (the launcher, the kernel menu) gets the same close
    // watch as one started from the picker.
    const watched = new WeakSet<ISessionContext>();
    const watch = (): void => {
      const context = (app.shell.currentWidget as (object & { sessionContext?: ISessionContext }) | null)
        ?.sessionContext;
      if (!context || watched.has(context)) {
        return;
      }
      watched.add(context);
      const isGpu = () =>
        (context.session?.kernel?.name ?? context.kernelPreference.name ?? '').startsWith(GPU_PREFIX);
      if (!context.isReady && isGpu()) {
        model.expectLaunch();
      }
      context.statusChanged.connect((_, status) => {
        if ((status === 'starting' || status === 'restarting') && isGpu()) {
          model.expectLaunch();
        }
      });
    };
    labShell?.currentChanged.connect(watch);

    if (statusBar) {
      const item = new CostStatus({
        model,
        currentKernelId: () => currentKernelId(app, labShell),
        onTopUp: topUp
      });
      statusBar.registerStatusItem('jupyter-io:cost', { item, align: 'left', rank: 4 });
    }

    if (settingRegistry) {
      settingRegistry
        .load(PLUGIN_ID)
        .then(settings => {
          const push = () =>
            model
              .savePreferences(preferencesFrom(settings))
              .catch(error => notifyError('jupyter-io settings not saved', error));
          // Settings only the server knows (written by another client, or by hand) stay
          // until the user changes them here.
          if (Object.keys(settings.user).length > 0) {
            void push();
          }
          settings.changed.connect(() => void push());
        })
        .catch(reason => console.error(`jupyter-io: cannot load settings: ${errorMessage(reason)}`));
    }
  }
};

export default plugin;
