import { Notification } from '@jupyterlab/apputils';

import { GpuModel } from './model';
import { IGpuType, IRoundTrip, ISession } from './types';

/**
 * Latency as the user sees it: measured from the Jupyter server (`jupyter_io/latency.py`),
 * never a provider's own figure. A type's card says `12 ms` (its best measured round trip),
 * `12 ms via relay`, `not measured yet` or `unreachable`; a running kernel's status says its
 * tunnel's live round trip, and a notification says when it has been much worse than its
 * best for a while.
 */

/** Milliseconds for people: `12 ms`, `0.4 ms`, `1.2 s`. */
export function ms(value: number): string {
  if (value >= 1000) {
    return `${(value / 1000).toFixed(1)} s`;
  }
  return value < 10 ? `${value.toFixed(1)} ms` : `${Math.round(value)} ms`;
}

/** What a GPU card says about its type's round trip. */
export function latencyText(type: IGpuType): string {
  if (type.latency_ms !== null && type.latency_ms !== undefined) {
    return `${ms(type.latency_ms)}${type.latency_via_relay ? ' via relay' : ''}`;
  }
  return type.latency_state === 'unreachable' ? 'unreachable' : 'not measured yet';
}

/** Its tooltip. */
export function latencyTitle(type: IGpuType): string {
  const what = 'Best round trip from this Jupyter server to a provider of this type';
  if (type.latency_via_relay) {
    return `${what}, through the coordinator’s relay (its ping + its own hop to the provider)`;
  }
  return `${what} (measured with the providers’ ping; a provider cannot state its own)`;
}

/** A running kernel's round trip for the status bar: `RTT 12 ms`, or null when unknown. */
export function roundTripText(roundTrip: IRoundTrip | undefined): string | null {
  if (!roundTrip || roundTrip.ms === null) {
    return null;
  }
  return `RTT ${ms(roundTrip.ms)}${roundTrip.degraded ? ' (slow)' : ''}`;
}

/** The lines of the status bar's tooltip about the round trip. */
export function roundTripTitle(roundTrip: IRoundTrip | undefined): string[] {
  if (!roundTrip) {
    return [];
  }
  const lines: string[] = [];
  if (roundTrip.ms !== null) {
    const best = roundTrip.best_ms !== null ? ` (best ${ms(roundTrip.best_ms)})` : '';
    lines.push(`Round trip: ${ms(roundTrip.ms)}${best}, from the tunnel’s keepalive pings`);
  }
  if (roundTrip.measured_ms !== null) {
    const relay = roundTrip.via_relay ? ' via relay' : '';
    lines.push(`Measured before the lease: ${ms(roundTrip.measured_ms)}${relay}`);
  }
  return lines;
}

/**
 * Tells the user once when a running kernel's round trip has degraded for long (the
 * server's `round_trip.degraded`), and again only after it recovered and degraded anew.
 */
export class RoundTripNotifier {
  constructor(model: GpuModel) {
    this._model = model;
    model.changed.connect(this._check, this);
  }

  dispose(): void {
    this._model.changed.disconnect(this._check, this);
  }

  private _check(_: GpuModel, change: string): void {
    if (change !== 'sessions') {
      return;
    }
    const degraded = new Set<string>();
    for (const session of this._model.sessions) {
      if (session.state === 'running' && session.round_trip?.degraded) {
        degraded.add(session.kernel_id);
        if (!this._told.has(session.kernel_id)) {
          this._notify(session);
        }
      }
    }
    this._told = degraded;
  }

  private _notify(session: ISession): void {
    const roundTrip = session.round_trip as IRoundTrip;
    const now = roundTrip.ms !== null ? ms(roundTrip.ms) : '?';
    const best = roundTrip.best_ms !== null ? ms(roundTrip.best_ms) : '?';
    Notification.warning(
      `The connection to ${session.gpu ?? 'the remote kernel'} is slow: ${now} round trip ` +
        `for ${Math.round(roundTrip.degraded_for_s)} s (it was ${best}). Each execution waits ` +
        'that long; the kernel keeps running.',
      { autoClose: 15000 }
    );
  }

  private _model: GpuModel;
  private _told = new Set<string>();
}
